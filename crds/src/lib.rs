pub mod config;
pub mod crdgen;
pub mod dkim_key;
mod mirror;
pub mod sending_domain;
pub mod smtp_relay;
pub mod status;
pub mod tracking;
