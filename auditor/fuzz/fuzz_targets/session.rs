//! Arbitrary bytes from both ends of a captured connection, in arbitrary interleavings,
//! with gaps: the session state machine never panics and its queues stay bounded by what
//! was sent.
#![no_main]

use auditor::{
    pg::{Direction, TokenizerLimits},
    audit::recorder::RecordingPolicy,
    capture::session::Session,
    sql::Analyzer,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    let limits = TokenizerLimits { max_buffered: 4096 };
    let mut session = Session::new(RecordingPolicy::default(), limits, control & 1 == 1);
    let mut analyzer = Analyzer::default();
    let mut out = Vec::new();
    let mut ts = 0i128;
    // Records: [flags][len][bytes]: flags bit 0 direction, bit 1 a gap before (of a size
    // from bits 3-7: inside a message, to its end, or past it), bit 2 not a call start.
    while let [flags, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        let direction = if flags & 1 == 0 {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        if flags & 2 != 0 {
            let lost = u64::from(flags >> 3) * 301 + 1;
            session.gap(direction, lost, ts, &mut analyzer, &mut out);
        }
        ts += 1000;
        session.push(direction, chunk, flags & 4 == 0, ts, &mut analyzer, &mut out);
    }
    session.abandon(ts, &mut out);
});
