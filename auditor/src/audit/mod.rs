//! The audit trail: the event (its fields declared once, its layouts derived in `schema`)
//! and the recorder that builds events from a conversation's outcomes.

pub mod event;
pub mod keyed;
pub mod recorder;
pub mod schema;
