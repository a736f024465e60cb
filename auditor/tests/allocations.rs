//! Allocations per statement on the steady path: a pgbench session's transactions
//! replayed through the decoder, the conversation and the recorder, counted by a
//! counting allocator. A bound, so a change that adds allocations per statement fails here
//! (the daemon's cost per statement is mostly allocation and what follows from it).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use auditor::{
    audit::recorder::{recycle, Draft, RecordingPolicy},
    capture::session::Session,
    pg::TokenizerLimits,
    sql::Analyzer,
};

#[path = "support/fixture_io.rs"]
mod fixture_io;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations per statement of pgbench's TPC-B-like transaction (`-M prepared`: Bind,
/// Describe, Execute, Sync per statement), with parameters hashed as by default: for a
/// statement with parameters, its Bind's values (one buffer, shared by the portal and the
/// event's source); the recorded list of their keyed hashes only when it does not fit in
/// place (more than three: the INSERT's five); nothing for one without (BEGIN, END). The
/// box a draft's event moves in is the thread's spare of a finished one. 1.14 today (was
/// 4.71 before event ids, parameter lists, command tags and repeated row descriptions
/// stopped allocating, 2.71 before short parameter lists were held in place, new events
/// made without their empty labels, and the drafts' boxes kept).
const MAX_PER_STATEMENT: f64 = 1.5;

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
    let mut replay = |chunks: &[(auditor::pg::Direction, Vec<u8>)], drafts: &mut Vec<_>| {
        for (dir, bytes) in chunks {
            ts += 1000;
            session.push(*dir, bytes, true, ts, &mut analyzer, drafts);
        }
    };
    replay(setup, &mut drafts);
    for _ in 0..10 {
        replay(steady, &mut drafts);
    }
    // As the daemon's thread does: the events go on in their boxes, and the boxes of a
    // batch the sink thread sent back are kept for the next drafts.
    let mut events = Vec::with_capacity(64);
    events.extend(drafts.drain(..).map(|d: Draft| d.event));
    events.drain(..).for_each(recycle);
    const ROUNDS: usize = 200;
    let mut statements = 0usize;
    COUNTING.store(true, Ordering::Relaxed);
    for _ in 0..ROUNDS {
        replay(steady, &mut drafts);
        statements += drafts.len();
        events.extend(drafts.drain(..).map(|d: Draft| d.event));
        events.drain(..).for_each(recycle);
    }
    COUNTING.store(false, Ordering::Relaxed);
    let per = ALLOCATIONS.load(Ordering::Relaxed) as f64 / statements as f64;
    println!("{statements} statements, {per:.2} allocations per statement");
    assert_eq!(statements, ROUNDS * 14);
    assert!(
        per <= MAX_PER_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_STATEMENT} expected"
    );
}
