//! The `weir` command's library: loading `weir.toml` for the whole stack and starting any set of
//! services in one process.
//!
//! `weir up` starts all five services, `weir serve <service>` one of them; the end-to-end tests
//! start the same stack on `127.0.0.1:0` through [`stack::start`], so what the tests prove is what
//! users run.
#![warn(missing_docs)]

pub mod batch_cli;
pub mod call;
pub mod chat;
pub mod health;
pub mod jobs_cli;
pub mod replicas;
pub mod review_cli;
pub mod routes_cli;
pub mod stack;
pub mod worker;
