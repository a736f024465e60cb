//! Hints to this core's cache on the hot path. The decoding thread writes each event on
//! its core and a sink thread reads it on another; the kernel writes capture records on
//! the cores its programs run on. Where the next object to touch is known ahead, asking
//! for its cache lines while the current one is worked on spares the wait for the other
//! core's cache at the first touch of each line (up to a fifth of a thread's time in the
//! profiles under pgbench). Hints only: nothing is read or written, an address needs not
//! be mapped, and other targets than x86-64 do without.

/// How many objects ahead [`prefetched`] asks.
const AHEAD: usize = 2;

const LINE: usize = 64;

/// Asks for the cache lines of `len` bytes from `at`, to be read (`write`: written) soon.
#[inline]
pub fn prefetch_bytes(at: *const u8, len: usize, write: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        let first = at as usize & !(LINE - 1);
        let lines = (at as usize % LINE).saturating_add(len).div_ceil(LINE);
        // Counted, not compared with an end: an address near the top wraps, never loops.
        for i in 0..lines {
            let line = first.wrapping_add(i * LINE);
            // SAFETY: a prefetch hint neither accesses memory nor faults, whatever the
            // address.
            unsafe {
                if write {
                    _mm_prefetch::<_MM_HINT_ET0>(line as *const i8)
                } else {
                    _mm_prefetch::<_MM_HINT_T0>(line as *const i8)
                }
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len, write);
}

/// Asks for the cache lines of `value`, to be read soon.
#[inline]
pub fn prefetch<T>(value: &T) {
    prefetch_bytes((value as *const T).cast(), std::mem::size_of::<T>(), false)
}

/// The items of `boxes` in order, each one's cache lines asked for [`AHEAD`] items before
/// it is read.
pub fn prefetched<T>(boxes: &[Box<T>]) -> impl Iterator<Item = &T> {
    for b in boxes.iter().take(AHEAD) {
        prefetch::<T>(b);
    }
    boxes.iter().enumerate().map(move |(i, b)| {
        if let Some(ahead) = boxes.get(i + AHEAD) {
            prefetch::<T>(ahead);
        }
        &**b
    })
}

/// As [`prefetched`], taking the boxes out of `boxes` (left empty, its capacity kept).
pub fn prefetched_drain<T>(boxes: &mut Vec<Box<T>>, mut f: impl FnMut(Box<T>)) {
    for b in boxes.iter().rev().take(AHEAD) {
        prefetch::<T>(b);
    }
    let n = boxes.len();
    // From the end, so that each box is taken without moving the others; the hint walks
    // the same way.
    for i in (0..n).rev() {
        if let Some(ahead) = i.checked_sub(AHEAD).and_then(|j| boxes.get(j)) {
            prefetch::<T>(ahead);
        }
        f(boxes.pop().expect("i < len"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walks yield every item once, whatever their length next to how far ahead
    /// they ask; the draining one from the last, leaving the list empty.
    #[test]
    fn walks_yield_every_item_once() {
        for n in [0u32, 1, 2, 3, 7] {
            let mut boxes: Vec<Box<u32>> = (0..n).map(Box::new).collect();
            let seen: Vec<u32> = prefetched(&boxes).copied().collect();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            let mut taken = Vec::new();
            prefetched_drain(&mut boxes, |b| taken.push(*b));
            assert_eq!(taken, (0..n).rev().collect::<Vec<_>>());
            assert!(boxes.is_empty());
        }
        // Any address is a valid hint.
        prefetch_bytes(std::ptr::null(), 4096, false);
        prefetch_bytes(usize::MAX as *const u8, 4096, true);
    }
}
