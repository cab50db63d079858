//! The router: OpenAI-compatible HTTP and gRPC Generate front ends, and the
//! dispatcher that picks workers and decides disaggregation.

pub mod adapters;
pub mod api;
pub mod dashboard;
pub mod dispatch;
pub mod dispatcher;
pub mod pairs;
pub mod policy;
pub mod workers;
