//! Allocations per statement on the steady path: a pgbench session's transactions
//! replayed through the decoder, the conversation and the recorder, counted by a
//! counting allocator. A bound, so a change that adds allocations per statement fails here
//! (the daemon's cost per statement is mostly allocation and what follows from it).

use auditor::{
    audit::recorder::{recycle, Draft, RecordingPolicy},
    capture::session::Session,
    pg::TokenizerLimits,
    sql::Analyzer,
};

#[path = "support/fixture_io.rs"]
mod fixture_io;

#[path = "support/counting.rs"]
mod counting;

/// Allocations per statement of pgbench's TPC-B-like transaction (`-M prepared`: Bind,
/// Describe, Execute, Sync per statement), with parameters hashed as by default: the
/// recorded list of the keyed hashes only when it does not fit in place (more than three:
/// the INSERT's five); nothing else. A Bind writes its values over the buffer of the Bind
/// before once that statement's event is recorded (the drafts' sources dropped, as the
/// tracker drops them after each chunk); the box a draft's event moves in is the thread's
/// spare of a finished one. 0.14 today (was 4.71 before event ids, parameter lists,
/// command tags and repeated row descriptions stopped allocating, 2.71 before short
/// parameter lists were held in place, new events made without their empty labels, and
/// the drafts' boxes kept, 1.14 before Binds wrote over the buffer of the one before).
const MAX_PER_STATEMENT: f64 = 0.3;

#[test]
fn a_steady_prepared_statement_allocates_a_bounded_few_times() {
    let chunks = fixture_io::load("pgbench-prepared-1");
    // Chunks 30..58: two whole transactions of seven statements on statements prepared
    // before (the session's startup and Parse messages come first); 58 is Terminate.
    let (setup, steady) = (&chunks[..30], &chunks[30..58]);
    let mut session = Session::new(
        RecordingPolicy::new(false, false, b"a key for the test"),
        TokenizerLimits::default(),
        false,
    );
    let mut analyzer = Analyzer::default();
    let mut drafts = Vec::with_capacity(64);
    let mut ts = 0i128;
    // As the daemon's thread does: after each chunk the events go on in their boxes (the
    // rest of each draft dropped), and the boxes of a batch the sink thread sent back are
    // kept for the next drafts.
    let mut events = Vec::with_capacity(64);
    let mut replay = |chunks: &[(auditor::pg::Direction, Vec<u8>)], events: &mut Vec<_>| {
        for (dir, bytes) in chunks {
            ts += 1000;
            session.push(*dir, bytes, true, ts, &mut analyzer, &mut drafts);
            events.extend(drafts.drain(..).map(|d: Draft| d.event));
        }
    };
    replay(setup, &mut events);
    for _ in 0..10 {
        replay(steady, &mut events);
    }
    events.drain(..).for_each(recycle);
    const ROUNDS: usize = 200;
    let mut statements = 0usize;
    let allocations = counting::counted(|| {
        for _ in 0..ROUNDS {
            replay(steady, &mut events);
            statements += events.len();
            events.drain(..).for_each(recycle);
        }
    });
    let per = allocations as f64 / statements as f64;
    println!("{statements} statements, {per:.2} allocations per statement");
    assert_eq!(statements, ROUNDS * 14);
    assert!(
        per <= MAX_PER_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_STATEMENT} expected"
    );
}
