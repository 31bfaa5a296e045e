//! Embedded single-node backend.
