//! Seeded synthetic checkpoints for any supported architecture and shape.
//!
//! (IMPLEMENTATION IN PROGRESS.)
