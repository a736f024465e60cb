//! Where audit events go. The local hash-chained log is the embedded default.

pub mod local;
