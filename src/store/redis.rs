//! The Redis store (not implemented yet).
