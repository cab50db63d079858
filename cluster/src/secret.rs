//! The cluster secret: worker ports accept only callers that present it
//! (gRPC metadata `x-tandem-cluster-secret`), compared in constant time.

use subtle::ConstantTimeEq;
use tandem_proto::worker::SECRET_METADATA;
use tonic::{Request, Status};

#[derive(Clone, Default)]
pub struct ClusterSecret(String);

impl ClusterSecret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn matches(&self, other: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(other).into()
    }
    /// Adds the secret to an outgoing call.
    pub fn attach<T>(&self, mut req: Request<T>) -> Request<T> {
        if let Ok(v) = self.0.parse() {
            req.metadata_mut().insert(SECRET_METADATA, v);
        }
        req
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// A tonic interceptor refusing calls without the secret.
#[derive(Clone, Debug)]
pub struct SecretCheck(pub ClusterSecret);

impl tonic::service::Interceptor for SecretCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let why = match req.metadata().get(SECRET_METADATA) {
            Some(v) if self.0.matches(v.as_bytes()) => return Ok(req),
            Some(_) => "wrong cluster secret".to_string(),
            None => format!("missing cluster secret ({SECRET_METADATA} metadata)"),
        };
        warn_refused(&why, req.remote_addr());
        Err(Status::unauthenticated(why))
    }
}

/// Logs a refused caller, at most once per [`REFUSAL_LOG_EVERY`]: a
/// misconfigured router polls every second or so.
fn warn_refused(why: &str, from: Option<std::net::SocketAddr>) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let Ok(mut last) = LAST.lock() else { return };
    if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
        return;
    }
    *last = Some(std::time::Instant::now());
    let from = from.map_or_else(|| "unknown".to_string(), |a| a.to_string());
    tracing::warn!(%from, "refused a caller: {why} (is TANDEM_CLUSTER_SECRET the same on every node?)");
}

const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn refuses_missing_and_wrong_secrets() {
        let s = ClusterSecret::new("s3cret");
        let mut check = SecretCheck(s.clone());
        assert!(check.call(s.attach(Request::new(()))).is_ok());
        let e = check.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let wrong = ClusterSecret::new("other").attach(Request::new(()));
        assert_eq!(
            check.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
