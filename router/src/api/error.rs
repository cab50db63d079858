//! Errors in OpenAI's shape, shared by the HTTP and gRPC front ends.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::dispatch::DispatchError;

/// An error as the client sees it: `{"error":{"message","type","param","code"}}`
/// with OpenAI's status codes (mapped to gRPC codes by [`ApiError::to_status`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, …
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 400 with code `invalid_value` for a parameter out of range or of the wrong type.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message, Some(param)).with_code("invalid_value")
    }

    /// 400 for a known OpenAI parameter that tandem does not support.
    pub fn unsupported(param: &str, detail: &str) -> Self {
        Self::invalid(
            format!("'{param}' is not supported by this server{detail}"),
            Some(param),
        )
        .with_code("unsupported_parameter")
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model '{model}' does not exist"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found".into()),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("internal_error".into()),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable".into()),
        }
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The JSON body (also used as the payload of an SSE error event).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The gRPC status for the same failure.
    pub fn to_status(&self) -> tonic::Status {
        let msg = match &self.param {
            Some(p) => format!("{} (param: {p})", self.message),
            None => self.message.clone(),
        };
        match self.status {
            StatusCode::BAD_REQUEST => tonic::Status::invalid_argument(msg),
            StatusCode::NOT_FOUND => tonic::Status::not_found(msg),
            StatusCode::UNAUTHORIZED => tonic::Status::unauthenticated(msg),
            StatusCode::SERVICE_UNAVAILABLE => tonic::Status::unavailable(msg),
            StatusCode::PAYLOAD_TOO_LARGE => tonic::Status::invalid_argument(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Invalid(m) => ApiError::invalid(m, None),
            DispatchError::Unavailable(m) => ApiError::unavailable(m),
            DispatchError::Internal(m) => ApiError::internal(m),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
