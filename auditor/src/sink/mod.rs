//! Where audit events go. The local hash-chained log is the embedded default; ClickHouse
//! (through an on-disk spool) can run beside it.

pub mod clickhouse;
pub mod local;
pub mod record;
pub mod spool;
