//! vLLM's runtime LoRA endpoints: `POST /v1/load_lora_adapter`
//! (`{"lora_name", "lora_path"}`) and `POST /v1/unload_lora_adapter`
//! (`{"lora_name"}`), answered as vLLM answers them (a line of text on
//! success, an error object otherwise).
//!
//! Off unless the router was started with `--allow-runtime-lora`: the
//! path is read on the workers' machines, so whoever may call these may
//! make every worker open a directory of their choosing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::openai::{counted, parse_object, string};
use super::{ApiError, ApiState};
use crate::dispatch::AdapterError;

/// Longest adapter name accepted: it becomes a `model` id and a metric label.
const MAX_NAME_CHARS: usize = 256;

/// `POST /v1/load_lora_adapter`.
pub(super) async fn load(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted("lora_adapters", async move {
        let parsed = request(&state, body, &["lora_name", "lora_path"]).and_then(|m| {
            let name = lora_name(&state, &m)?;
            let path = string(&m, "lora_path")?
                .filter(|p| !p.trim().is_empty())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "'lora_path' (the adapter's directory) is required",
                        Some("lora_path"),
                    )
                })?;
            Ok((name, path.to_string()))
        });
        match parsed {
            Ok((name, path)) => {
                let done = state.backend.load_adapter(name.clone(), path).await;
                answer(done, &name, "added")
            }
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// `POST /v1/unload_lora_adapter`.
pub(super) async fn unload(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted("lora_adapters", async move {
        // vLLM's request carries `lora_int_id` too; it names nothing here.
        let parsed = request(&state, body, &["lora_name", "lora_int_id"])
            .and_then(|m| lora_name(&state, &m));
        match parsed {
            Ok(name) => {
                let done = state.backend.unload_adapter(name.clone()).await;
                answer(done, &name, "removed")
            }
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// vLLM's answer: a line of text on success, else the error object.
fn answer(done: Result<(), AdapterError>, name: &str, verb: &str) -> Response {
    match done {
        Ok(()) => (
            StatusCode::OK,
            format!("Success: LoRA adapter '{name}' {verb} successfully."),
        )
            .into_response(),
        Err(AdapterError::Invalid(m)) => ApiError::invalid(m, None).into_response(),
        Err(AdapterError::NotFound(m)) => ApiError::not_found(m).into_response(),
        Err(AdapterError::Unavailable(m)) => ApiError::unavailable(m).into_response(),
    }
}

/// The request's body: once the endpoints are on, an object of `known`
/// fields only (one the endpoint does not read is refused, not ignored).
fn request(
    state: &ApiState,
    body: Result<Bytes, BytesRejection>,
    known: &[&str],
) -> Result<Map<String, Value>, ApiError> {
    allowed(state)?;
    let m = parse_object(body)?;
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(m),
        Some(k) => Err(ApiError::unsupported(k, "")),
    }
}

fn allowed(state: &ApiState) -> Result<(), ApiError> {
    if state.runtime_lora {
        Ok(())
    } else {
        let mut e = ApiError::invalid(
            "loading and unloading LoRA adapters at run time is off; start the router with --allow-runtime-lora (tandem up --allow-runtime-lora) to allow it",
            None,
        )
        .with_code("runtime_lora_disabled");
        e.status = StatusCode::FORBIDDEN;
        Err(e)
    }
}

/// The request's `lora_name`: present, printable, not too long, and not
/// the served model's name (requests for that name get the base model).
fn lora_name(state: &ApiState, m: &Map<String, Value>) -> Result<String, ApiError> {
    let name = string(m, "lora_name")?
        .ok_or_else(|| ApiError::invalid("'lora_name' is required", Some("lora_name")))?;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(ApiError::bad_param(
            "lora_name",
            "'lora_name' must be a non-empty name without control characters",
        ));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::bad_param(
            "lora_name",
            format!("'lora_name' is longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name == state.served_model_name {
        return Err(ApiError::bad_param(
            "lora_name",
            format!("'{name}' is the served model's name; an adapter needs a name of its own"),
        ));
    }
    Ok(name.to_string())
}
