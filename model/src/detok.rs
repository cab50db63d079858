//! Incremental, UTF-8-safe detokenisation and stop-string matching.
//!
//! (IMPLEMENTATION IN PROGRESS.)
