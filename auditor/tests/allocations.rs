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

/// Allocations per statement of pgbench's TPC-B-like transaction in the extended protocol
/// (`-M extended`: Parse of the unnamed statement, Bind, Describe, Execute, Sync per
/// statement): the unnamed statement each Parse makes (a statement's description never
/// changes: a new Parse is a new statement), the INSERT's parameter list; nothing else.
/// 1.43 today (2.43 before a statement without declared parameter types shared the empty
/// list).
const MAX_PER_EXTENDED_STATEMENT: f64 = 1.6;

/// Allocations per statement while the last transaction of a pgbench transcript (its last
/// `turn` chunks before Terminate) is answered again and again, after the rest.
fn steady_allocations(name: &str, turn: usize) -> f64 {
    let mut chunks = fixture_io::load(name);
    chunks.pop(); // Terminate
    let steady = chunks.split_off(chunks.len() - turn);
    let setup = chunks;
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
    replay(&setup, &mut events);
    for _ in 0..10 {
        replay(&steady, &mut events);
    }
    events.drain(..).for_each(recycle);
    const ROUNDS: usize = 200;
    let mut statements = 0usize;
    let allocations = counting::counted(|| {
        for _ in 0..ROUNDS {
            replay(&steady, &mut events);
            statements += events.len();
            events.drain(..).for_each(recycle);
        }
    });
    let per = allocations as f64 / statements as f64;
    println!("{name}: {statements} statements, {per:.2} allocations per statement");
    // Seven statements a transaction.
    assert_eq!(statements, ROUNDS * 7);
    per
}

#[test]
fn a_steady_prepared_statement_allocates_a_bounded_few_times() {
    let per = steady_allocations("pgbench-prepared-1", 14);
    assert!(
        per <= MAX_PER_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_STATEMENT} expected"
    );
}

#[test]
fn a_steady_extended_statement_allocates_a_bounded_few_times() {
    let per = steady_allocations("pgbench-extended-1", 14);
    assert!(
        per <= MAX_PER_EXTENDED_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_EXTENDED_STATEMENT} expected"
    );
}

/// Allocations per statement of a simple-protocol query (`SELECT ... WHERE aid = N;`, N
/// one of a thousand values, as psql sends it): the query's text, once (shared by the
/// statement, the whole string and the analysis, whose shape is written into the
/// analyzer's buffer); nothing else. 1.0 today (5 before the string of one statement was
/// kept in one allocation with its list in place, and the shape in a reused buffer).
const MAX_PER_SIMPLE_STATEMENT: f64 = 1.2;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn a_steady_simple_statement_allocates_only_its_text() {
    use auditor::pg::Direction;
    let setup = fixture_io::load("psql-simple-0");
    let mut columns = 1u16.to_be_bytes().to_vec();
    columns.extend_from_slice(b"abalance\0");
    columns.extend_from_slice(&[
        0, 0, 0x40, 0x06, 0, 3, 0, 0, 0, 0x17, 0, 4, 0xff, 0xff, 0xff,
    ]);
    columns.extend_from_slice(&[0xff, 0, 0]);
    let mut response = message(b'T', &columns);
    response.extend(message(b'D', &[0, 1, 0, 0, 0, 4, b'2', b'9', b'7', b'0']));
    response.extend(message(b'C', b"SELECT 1\0"));
    response.extend(message(b'Z', b"I"));
    let queries: Vec<Vec<u8>> = (0..1000u64)
        .map(|i| {
            let aid = 1 + i * 7919 % 100_000;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};\0");
            message(b'Q', sql.as_bytes())
        })
        .collect();
    let mut session = Session::new(
        RecordingPolicy::new(false, false, b"a key for the test"),
        TokenizerLimits::default(),
        false,
    );
    let mut analyzer = Analyzer::default();
    let mut drafts = Vec::with_capacity(64);
    let mut events = Vec::with_capacity(64);
    // psql's startup, then one round to warm up (the shape analysed, the boxes made).
    for (dir, bytes) in &setup[..2] {
        session.push(*dir, bytes, true, 0, &mut analyzer, &mut drafts);
    }
    let mut ts = 0i128;
    let mut turn = |query: &[u8], events: &mut Vec<_>| {
        ts += 1000;
        session.push(
            Direction::ToServer,
            query,
            true,
            ts,
            &mut analyzer,
            &mut drafts,
        );
        events.extend(drafts.drain(..).map(|d: Draft| d.event));
        session.push(
            Direction::ToClient,
            &response,
            true,
            ts + 500,
            &mut analyzer,
            &mut drafts,
        );
        events.extend(drafts.drain(..).map(|d: Draft| d.event));
    };
    for q in &queries[..100] {
        turn(q, &mut events);
    }
    events.drain(..).for_each(recycle);
    let mut statements = 0usize;
    let allocations = counting::counted(|| {
        for q in &queries[100..] {
            turn(q, &mut events);
            statements += events.len();
            events.drain(..).for_each(recycle);
        }
    });
    let per = allocations as f64 / statements as f64;
    println!("{statements} statements, {per:.2} allocations per statement");
    assert_eq!(statements, 900);
    assert!(
        per <= MAX_PER_SIMPLE_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_SIMPLE_STATEMENT} expected"
    );
}
