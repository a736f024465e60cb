//! Arbitrary bytes in either direction, cut into arbitrary pushes: the tokenizer and the
//! codec never panic, never hold more than their limits allow, and every message that
//! decodes encodes back to exactly the bytes it came from.
#![no_main]

use auditor::pg::{
    self, frontend, tokenizer::frame, BufferBudget, Direction, Token, Tokenizer,
    TokenizerLimits,
};
use libfuzzer_sys::fuzz_target;

const BUDGET: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let direction = if control & 1 == 0 {
        Direction::ToServer
    } else {
        Direction::ToClient
    };
    let limits = TokenizerLimits {
        max_buffered: [16, 256, 16 << 20][(control as usize >> 1) % 3],
    };
    let budget = BufferBudget::new(BUDGET);
    let mut t = if control & 0x40 == 0 {
        Tokenizer::new(direction, limits)
    } else {
        Tokenizer::typed(direction, limits)
    }
    .with_budget(budget.clone());
    if control & 0x80 != 0 {
        t = t.with_streamed(b"Dd");
    }
    // Cut points: every byte that equals the control byte ends a push.
    let mut pushed = 0u64;
    for piece in rest.split_inclusive(|&b| b == control) {
        let mut check = |tok: Token<'_>| match tok {
            Token::Message { tag, body, span } => {
                assert_eq!(span.end - span.start, 5 + body.len() as u64);
                if let Ok(m) = pg::decode(direction, tag, &body) {
                    assert_eq!(m.direction(), direction);
                    let mut out = Vec::new();
                    m.encode(&mut out);
                    assert_eq!(out, frame(tag, &body));
                }
            }
            Token::Startup { body, span } => {
                assert_eq!(span.end - span.start, 4 + body.len() as u64);
                if let Ok(m) = frontend::decode_startup(&body) {
                    let mut out = Vec::new();
                    m.encode(&mut out);
                    assert_eq!(&out[4..], &body[..]);
                }
            }
            Token::Header { .. } | Token::Chunk { .. } | Token::EncryptionReply { .. } => {}
        };
        let result = t.push(piece, &mut check);
        // Never more than one message's limit (or a startup packet's) held.
        assert!(t.buffered() <= (limits.max_buffered as usize + 5).max(10_000));
        assert!(budget.available() <= BUDGET);
        if result.is_err() {
            assert!(t.is_opaque());
            break;
        }
        pushed += piece.len() as u64;
        assert_eq!(t.offset(), pushed);
    }
    drop(t);
    assert_eq!(budget.available(), BUDGET);
});
