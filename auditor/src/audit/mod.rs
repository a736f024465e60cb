//! The audit trail's side of a conversation: events built from its outcomes.

pub mod recorder;
