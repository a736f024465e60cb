//! A host-level PostgreSQL traffic auditor: eBPF capture, protocol decoding, audit events.
//!
//! One module per concern; `main.rs` is only the command line.

pub mod approvals;
pub mod audit;
pub mod cache;
pub mod capture;
pub mod cli;
pub mod config;
pub mod console;
pub mod continuity;
pub mod conversation;
pub mod cpu;
pub mod daemon;
pub mod doctor;
pub mod fsutil;
pub mod metrics;
pub mod pg;
pub mod policy;
pub mod proxy;
pub mod query;
pub mod sink;
pub mod sql;
pub mod text;
pub mod tracker;
pub mod workload;
