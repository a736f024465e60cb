//! Allocations per statement on the steady path: a pgbench session's transactions
//! replayed through the decoder, the conversation and the recorder, counted by a
//! counting allocator. A bound, so a change that adds allocations per statement fails here
//! (the daemon's cost per statement is mostly allocation and what follows from it).

use auditor::{
    audit::recorder::{recycle, Draft, RecordingPolicy},
    capture::session::Session,
    pg::{Direction, TokenizerLimits},
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
/// statement): the INSERT's parameter list; nothing else (a Parse writes over the
/// unnamed statement it replaced once nothing holds that one, and a statement described
/// through its portal shares the portal's columns). 0.14 today, as prepared (1.43 before
/// those two, 2.43 before a statement without declared parameter types shared the empty
/// list).
const MAX_PER_EXTENDED_STATEMENT: f64 = 0.3;

type Chunks = Vec<(Direction, Vec<u8>)>;

/// Allocations per statement of `turns` (each a request and its answers, in chunks)
/// replayed one after another, again and again, after `setup`; each turn records
/// `statements` statements.
fn allocations_per_statement(
    setup: &[(Direction, Vec<u8>)],
    turns: &[Chunks],
    statements: usize,
) -> f64 {
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
    let mut replay = |chunks: &[(Direction, Vec<u8>)], events: &mut Vec<_>| {
        for (dir, bytes) in chunks {
            ts += 1000;
            session.push(*dir, bytes, true, ts, &mut analyzer, &mut drafts);
            events.extend(drafts.drain(..).map(|d: Draft| d.event));
        }
    };
    replay(setup, &mut events);
    // Warm: statements analysed, boxes made.
    for turn in turns.iter().cycle().take(100) {
        replay(turn, &mut events);
    }
    events.drain(..).for_each(recycle);
    const TURNS: usize = 1000;
    let mut recorded = 0usize;
    let allocations = counting::counted(|| {
        for turn in turns.iter().cycle().take(TURNS) {
            replay(turn, &mut events);
            recorded += events.len();
            events.drain(..).for_each(recycle);
        }
    });
    assert_eq!(recorded, TURNS * statements);
    allocations as f64 / recorded as f64
}

/// The last transaction of a pgbench transcript (its last `turn` chunks before
/// Terminate) as the turn, after the rest.
fn pgbench_allocations(name: &str, turn: usize) -> f64 {
    let mut chunks = fixture_io::load(name);
    chunks.pop(); // Terminate
    let steady = chunks.split_off(chunks.len() - turn);
    // Seven statements a transaction.
    let per = allocations_per_statement(&chunks, &[steady], 7);
    println!("{name}: {per:.2} allocations per statement");
    per
}

#[test]
fn a_steady_prepared_statement_allocates_a_bounded_few_times() {
    let per = pgbench_allocations("pgbench-prepared-1", 14);
    assert!(
        per <= MAX_PER_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_STATEMENT} expected"
    );
}

#[test]
fn a_steady_extended_statement_allocates_a_bounded_few_times() {
    let per = pgbench_allocations("pgbench-extended-1", 14);
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
    let turns: Vec<Chunks> = (0..1000u64)
        .map(|i| {
            let aid = 1 + i * 7919 % 100_000;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};\0");
            vec![
                (Direction::ToServer, message(b'Q', sql.as_bytes())),
                (Direction::ToClient, response.clone()),
            ]
        })
        .collect();
    // psql's startup first.
    let per = allocations_per_statement(&setup[..2], &turns, 1);
    println!("simple: {per:.2} allocations per statement");
    assert!(
        per <= MAX_PER_SIMPLE_STATEMENT,
        "{per:.2} allocations per statement, at most {MAX_PER_SIMPLE_STATEMENT} expected"
    );
}
