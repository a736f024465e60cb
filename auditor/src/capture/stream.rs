//! What the capture path asks of the tokenizer, and how it finds its footing again after
//! lost bytes. (The proxy sees every byte and needs neither.)

use crate::pg::{tokenizer::MAX_MESSAGE_LEN, Direction, Tokenizer, TokenizerLimits};

/// Message bodies the audit never needs: row contents and COPY data are only counted.
pub fn streamed_tags(direction: Direction) -> &'static [u8] {
    match direction {
        Direction::ToClient => b"Dd",
        Direction::ToServer => b"d",
    }
}

/// A tokenizer for one direction of a captured connection; `typed` when joining it
/// mid-stream.
pub fn tokenizer(direction: Direction, limits: TokenizerLimits, typed: bool) -> Tokenizer {
    let t = if typed {
        Tokenizer::typed(direction, limits)
    } else {
        Tokenizer::new(direction, limits)
    };
    t.with_streamed(streamed_tags(direction))
}

/// Whether `data` plausibly starts with a run of typed messages of `direction` that ends
/// exactly at its end or inside a message: used to find a message boundary after a gap.
pub fn plausible_boundary(direction: Direction, data: &[u8]) -> bool {
    let valid_tag = |t: u8| match direction {
        Direction::ToServer => b"QPBDECSHFdcfpX".contains(&t),
        Direction::ToClient => b"RKSZTDCIEN123ntsAcdGHWVv".contains(&t),
    };
    let mut at = 0usize;
    let mut seen = 0;
    while at + 5 <= data.len() {
        let tag = data[at];
        let len = u32::from_be_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]);
        if !valid_tag(tag) || !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return false;
        }
        seen += 1;
        at += 1 + len as usize;
    }
    seen > 0 && (at >= data.len() || data.len() - at < 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_detection() {
        assert!(plausible_boundary(
            Direction::ToServer,
            b"Q\0\0\0\x0dSELECT 1\0"
        ));
        assert!(plausible_boundary(Direction::ToServer, b"Q\0\0\0\x0dSELE"));
        assert!(!plausible_boundary(Direction::ToServer, b"ELECT 1\0"));
        assert!(!plausible_boundary(Direction::ToServer, b""));
    }
}
