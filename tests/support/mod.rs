//! Helpers shared by the integration tests: [`db`] for the store and the fault suite,
//! [`http`] for the HTTP tests, [`process`] for the examples run as processes, [`citus`]
//! for the tests that need a Citus coordinator, [`relay`] for a moved address and a
//! stalled network. All are re-exported:
//! `use support::{expire, Server, CitusSchema}`.

// Cargo builds every tests/*.rs as a binary of its own, with its own copy of this module,
// and each uses a subset (the store tests no HTTP helper, the HTTP tests no store helper):
// what one binary leaves unused, helpers and the other half's re-export, would warn there.
#![allow(dead_code)]

mod citus;
mod db;
mod http;
mod pooler;
mod process;
mod relay;

#[allow(unused_imports)] // see above
pub use {citus::*, db::*, http::*, pooler::*, process::*, relay::*};
