//! One listener per node serving gRPC and plain HTTP side by side: requests
//! with a `application/grpc` content type go to tonic, everything else to
//! axum (`/health`, `/ready`, `/metrics`, and the role's own routes). Every
//! node also serves `grpc.health.v1.Health` and server reflection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Whether the node takes work (`/ready`, gRPC health). Liveness
/// (`/health`) is simply "the process answers".
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Default)]
struct ReadinessState {
    /// Serving and not draining.
    up: AtomicBool,
    /// What else the node needs to do its job (a router: a decode worker
    /// to send requests to), with what to say while it lacks it.
    needs: OnceLock<Box<dyn Fn() -> Result<(), &'static str> + Send + Sync>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Readiness").field(&self.check()).finish()
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.up.store(ready, Ordering::Release);
    }

    /// Makes readiness also depend on `check` (the first call wins), which
    /// says why the node cannot take work when it cannot.
    pub fn require(&self, check: impl Fn() -> Result<(), &'static str> + Send + Sync + 'static) {
        let _ = self.0.needs.set(Box::new(check));
    }

    pub fn is_ready(&self) -> bool {
        self.check().is_ok()
    }

    /// Ready, or why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.0.up.load(Ordering::Acquire) {
            return Err("not ready");
        }
        match self.0.needs.get() {
            Some(check) => check(),
            None => Ok(()),
        }
    }
}

/// Who is speaking on `/metrics`: attached to every series as the labels
/// `model`, `role` and `worker_id`.
#[derive(Debug, Clone)]
pub struct NodeLabels {
    pub model: String,
    pub role: crate::Role,
    pub worker_id: String,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder with this node's labels
/// (the first call wins; a later one returns the installed handle).
pub fn install_metrics(labels: &NodeLabels) -> PrometheusHandle {
    HANDLE.get_or_init(|| build_recorder(Some(labels))).clone()
}

/// The process-wide Prometheus recorder (installed without node labels on
/// first use, as in a test process hosting several nodes).
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE.get_or_init(|| build_recorder(None)).clone()
}

fn build_recorder(labels: Option<&NodeLabels>) -> PrometheusHandle {
    let mut b = PrometheusBuilder::new();
    if let Some(l) = labels {
        b = b
            .add_global_label("model", l.model.clone())
            .add_global_label("role", l.role.as_str())
            .add_global_label("worker_id", l.worker_id.clone());
    }
    // Bucketed histograms (not the exporter's default summaries), so
    // quantiles aggregate across nodes in PromQL.
    for name in crate::metrics::HISTOGRAMS {
        b = match b.set_buckets_for_metric(
            Matcher::Full((*name).to_string()),
            crate::metrics::buckets_of(name),
        ) {
            Ok(b) => b,
            Err(_) => unreachable!("bucket lists are constant and non-empty"),
        };
    }
    let recorder = b.build_recorder();
    let handle = recorder.handle();
    // Another recorder may already be installed (a test process hosting
    // several nodes): then this handle renders nothing, which only affects
    // that process's /metrics.
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed");
    }
    crate::metrics::describe();
    handle
}

pub struct NodeServer {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Reports `status` under each name a node answers gRPC health checks
/// for: the server ("") and each of its services.
async fn report_health(
    reporter: &tonic_health::server::HealthReporter,
    names: &[&'static str],
    status: tonic_health::ServingStatus,
) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

impl NodeServer {
    /// Binds the node's one port (`0` picks a free one).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`, then lets in-flight requests finish.
    /// `services` names the gRPC services in `grpc`, which reflection lists.
    pub async fn serve(
        self,
        grpc: tonic::service::Routes,
        services: Vec<&'static str>,
        http: axum::Router,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        // Health is reported for the server ("") and for each service by
        // name (probes may ask for either).
        let health_names: Vec<&'static str> = std::iter::once("")
            .chain(services.iter().copied())
            .collect();
        report_health(
            &reporter,
            &health_names,
            tonic_health::ServingStatus::NotServing,
        )
        .await;
        let (reflection, reflection_v1alpha) =
            tandem_proto::reflection_services(&services, &[tonic_health::pb::FILE_DESCRIPTOR_SET])
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        let grpc = grpc
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .prepare();
        let grpc_router = grpc.into_axum_router();
        let metrics = metrics_handle();
        let r = readiness.clone();
        let ops = axum::Router::new()
            .route("/health", get(|| async { "ok\n" }))
            .route(
                "/ready",
                get(move || {
                    let ready = r.check();
                    async move {
                        match ready {
                            Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let text = metrics.render();
                    async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
                }),
            )
            .method_not_allowed_fallback(|req: Request| async move {
                error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "Method {} is not allowed on {}",
                        req.method(),
                        req.uri().path()
                    ),
                )
            });
        let http = http.merge(ops).fallback(move |req: Request| {
            let grpc = grpc_router.clone();
            async move {
                if is_grpc(&req) {
                    match grpc.oneshot(req).await {
                        Ok(r) => r,
                        Err(e) => match e {},
                    }
                } else {
                    not_found(&req)
                }
            }
        });
        // Report gRPC health from the readiness flag.
        let health_task = {
            let readiness = readiness.clone();
            let shutdown = shutdown.clone();
            let names = health_names;
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    let now = readiness.is_ready() && !shutdown.is_cancelled();
                    if last != Some(now) {
                        let status = if now {
                            tonic_health::ServingStatus::Serving
                        } else {
                            tonic_health::ServingStatus::NotServing
                        };
                        report_health(&reporter, &names, status).await;
                        last = Some(now);
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            report_health(&reporter, &names, tonic_health::ServingStatus::NotServing).await;
                            break;
                        }
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    }
                }
            })
        };
        let res = serve_http(self.listener, http, shutdown).await;
        health_task.abort();
        res
    }
}

/// Longest an HTTP/1 client may take to send a request's headers (also how
/// long an idle keep-alive connection stays open).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What `axum::serve` does, with KV-sized HTTP/2 settings
/// ([`tandem_proto::http2`]: a decode worker with `--kv-transport grpc`
/// takes KV on this port): serves `app`
/// on every connection (HTTP/1.1 or HTTP/2) until `shutdown`, then stops
/// accepting and lets the connections finish what they are doing.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // An HTTP/1 client that does not finish its request headers in time is
    // cut off, instead of holding a connection and a task for ever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .initial_stream_window_size(tandem_proto::http2::STREAM_WINDOW)
        .initial_connection_window_size(tandem_proto::http2::CONNECTION_WINDOW)
        .max_frame_size(tandem_proto::http2::MAX_FRAME);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait for some to close.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .map_request(|r: Request<hyper::body::Incoming>| r.map(Body::new)),
        );
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// 404 in OpenAI's error shape and words (the router's clients expect
/// them; for the workers they are as good as any).
fn not_found(req: &Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("Unknown request URL: {} {}", req.method(), req.uri().path()),
    )
}

/// An error of the node's own routes in OpenAI's shape.
fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": null,
            "code": code,
        }
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body.to_string()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// gRPC health answers for the server and for each of its services by
    /// name (a probe may name one), as the readiness flag says.
    #[tokio::test]
    async fn grpc_health_answers_for_each_service_by_name() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
        let server = NodeServer::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let readiness = Readiness::default();
        let serving = tokio::spawn(server.serve(
            tonic::service::Routes::default(),
            vec!["tandem.v1.Generate"],
            axum::Router::new(),
            readiness.clone(),
            shutdown.clone(),
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let status = |name: &str| HealthCheckRequest {
            service: name.into(),
        };
        for name in ["", "tandem.v1.Generate"] {
            let r = client.check(status(name)).await.expect(name).into_inner();
            assert_eq!(r.status, ServingStatus::NotServing as i32, "{name:?}");
        }
        readiness.set(true);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        for name in ["", "tandem.v1.Generate"] {
            let r = client.check(status(name)).await.expect(name).into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{name:?}");
        }
        let unknown = client.check(status("no.Such")).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        shutdown.cancel();
        serving.await.unwrap().unwrap();
    }

    /// A node with no services of its own, serving on a loopback port
    /// until the token is cancelled.
    async fn bare_node() -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let server = NodeServer::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(server.serve(
            tonic::service::Routes::default(),
            Vec::new(),
            axum::Router::new(),
            Readiness::default(),
            shutdown.clone(),
        ));
        (addr, shutdown, serving)
    }

    /// A client that stops halfway through its request headers is cut off
    /// after `HEADER_READ_TIMEOUT`; a whole request is still answered.
    #[tokio::test(start_paused = true)]
    async fn a_client_stalled_in_its_headers_is_cut_off() {
        let (addr, shutdown, serving) = bare_node().await;
        let mut whole = tokio::net::TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        whole.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /health HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, stalled.read(&mut buf))
            .await
            .expect("a stalled client is not waited on for ever")
            .unwrap_or(0);
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT);
        shutdown.cancel();
        serving.await.unwrap().unwrap();
    }

    /// The node's own routes answer a wrong method 405 and an unknown path
    /// 404, both as JSON errors in OpenAI's shape.
    #[tokio::test]
    async fn wrong_methods_and_paths_get_json_errors() {
        let (addr, shutdown, serving) = bare_node().await;
        for (request, status, code, words) in [
            (
                "PATCH /health",
                "405",
                "method_not_allowed",
                "Method PATCH is not allowed on /health",
            ),
            (
                "POST /metrics",
                "405",
                "method_not_allowed",
                "Method POST is not allowed on /metrics",
            ),
            (
                "GET /nowhere",
                "404",
                "not_found",
                "Unknown request URL: GET /nowhere",
            ),
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "{request} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            c.write_all(head.as_bytes()).await.unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).await.unwrap();
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(body).expect(&answer);
            assert_eq!(v["error"]["code"], code, "{answer}");
            assert_eq!(v["error"]["message"], words, "{answer}");
        }
        shutdown.cancel();
        serving.await.unwrap().unwrap();
    }
}
