//! The daemon's own CPU time, by thread, from `/proc/self/task/*/stat`: what observing
//! costs the host it runs on, in `auditor stats` and the metrics (the bench measures it
//! the same way, per thread, per statement).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::workload::process::{ns_per_tick, stat_fields};

/// CPU seconds in user and in kernel mode.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Seconds {
    pub user_s: f64,
    pub system_s: f64,
}

impl Seconds {
    pub fn total(&self) -> f64 {
        self.user_s + self.system_s
    }

    fn add(&mut self, other: Seconds) {
        self.user_s += other.user_s;
        self.system_s += other.system_s;
    }
}

/// The process's CPU time since it started, and its threads' (by name: threads of one
/// name, such as a runtime's workers, added up).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuStats {
    /// The whole process, threads that have ended included.
    pub process: Seconds,
    /// The threads, by name; the first thread is `main` (it reads the ring buffer,
    /// decodes the protocol and builds the events). A thread that ended counts the time
    /// it had when last read (the daemon reads it each second).
    pub threads: BTreeMap<String, Seconds>,
}

/// The user and system time of a `stat` line of `/proc` (fields 14 and 15), in clock
/// ticks, and the thread's name.
fn parse_stat(line: &str) -> Option<(&str, u64, u64)> {
    let (name, mut fields) = stat_fields(line)?;
    let user = fields.nth(14 - 3)?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some((name, user, system))
}

/// This process's CPU time now, and its threads' by id (with their names). What cannot be
/// read (a thread that ended meanwhile) is left out; an unreadable `/proc` gives zeros.
fn read_tasks() -> (Seconds, BTreeMap<u32, (String, Seconds)>) {
    let tick = ns_per_tick() as f64 / 1e9;
    let seconds = |user: u64, system: u64| Seconds {
        user_s: user as f64 * tick,
        system_s: system as f64 * tick,
    };
    let mut process = Seconds::default();
    if let Ok(line) = std::fs::read_to_string("/proc/self/stat") {
        if let Some((_, u, s)) = parse_stat(&line) {
            process = seconds(u, s);
        }
    }
    let mut threads = BTreeMap::new();
    let pid = std::process::id();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (process, threads);
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(line) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((name, u, s)) = parse_stat(&line) else {
            continue;
        };
        let name = if tid == pid { "main" } else { name };
        threads.insert(tid, (name.to_string(), seconds(u, s)));
    }
    (process, threads)
}

/// The daemon's CPU time read again and again (each second): a thread that ends keeps,
/// under its name, the time it had when last read, so each name's count only grows (the
/// sink thread's is still there in the stats written after it stopped).
#[derive(Debug, Default)]
pub struct CpuCounter {
    /// Threads running when last read.
    live: BTreeMap<u32, (String, Seconds)>,
    /// Threads that ended since, by name: their time when last read.
    ended: BTreeMap<String, Seconds>,
}

impl CpuCounter {
    pub fn read(&mut self) -> CpuStats {
        let (process, live) = read_tasks();
        for (tid, (name, t)) in std::mem::replace(&mut self.live, live) {
            if !self.live.contains_key(&tid) {
                self.ended.entry(name).or_default().add(t);
            }
        }
        let mut threads = self.ended.clone();
        for (name, t) in self.live.values() {
            threads.entry(name.clone()).or_default().add(*t);
        }
        CpuStats { process, threads }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's CPU time now (threads running now only).
    fn read_self() -> CpuStats {
        CpuCounter::default().read()
    }

    #[test]
    fn a_stat_line_gives_its_name_and_times() {
        let line = "4242 (ch-send) S 1 4242 4242 0 -1 4194368 1000 0 0 0 731 42 0 0 20 0 \
                    9 0 123 4096 100 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("ch-send", 731, 42)));
        // A name with spaces and parentheses of its own.
        let odd = "7 (a) (b c) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(odd), Some(("a) (b c", 5, 6)));
        assert_eq!(parse_stat("7 (x) R 1 2 3"), None);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_stat("7 (x) R 1 7 7 0 -1 0 0 0 0 0 five 6 0"),
            None,
            "not a number"
        );
    }

    #[test]
    fn this_process_has_a_main_thread_and_the_threads_it_named() {
        let (started, on_start) = std::sync::mpsc::channel();
        let spin = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(move || {
                started.send(()).unwrap();
                // Works until its time shows (a clock tick: 10 ms at 100 Hz), or 10 s.
                let start = std::time::Instant::now();
                let mut x = 0u64;
                loop {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                    let s = read_self();
                    let shown = s
                        .threads
                        .get("cpu-test-spin")
                        .is_some_and(|t| t.total() > 0.0);
                    if shown || start.elapsed() > std::time::Duration::from_secs(10) {
                        return s;
                    }
                }
            })
            .unwrap();
        // Read while it runs (named: it names itself as it starts).
        on_start.recv().unwrap();
        let mut counter = CpuCounter::default();
        let before = counter.read();
        let s = spin.join().unwrap();
        assert!(s.threads.contains_key("main"), "{s:?}");
        let spun = s.threads["cpu-test-spin"];
        assert!(spun.total() > 0.0, "{s:?}");
        assert!(s.process.total() >= spun.total(), "{s:?}");
        // The thread has ended: its time stays, as last read (while it was running).
        assert!(before.threads["cpu-test-spin"].total() >= 0.0);
        let after = counter.read();
        assert_eq!(
            after.threads.get("cpu-test-spin"),
            before.threads.get("cpu-test-spin"),
            "{after:?}"
        );
        assert!(!read_self().threads.contains_key("cpu-test-spin"));
    }
}
