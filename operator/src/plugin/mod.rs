//! `kubectl-petrel`, the kubectl plugin: what the operator knows, read from
//! the API with the user's kubeconfig. Formatting is pure ([`format`]); the
//! API calls are in [`commands`].

pub mod commands;
pub mod format;
