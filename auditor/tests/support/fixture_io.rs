//! Reading the recorded protocol transcripts (tests/fixtures/*.jsonl): one JSON object per
//! read, `{"d": "c" | "s", "hex": ...}` (client or server bytes).

use auditor::pg::Direction;

/// (direction, bytes) as the recording proxy read them.
pub fn load(name: &str) -> Vec<(Direction, Vec<u8>)> {
    let path = format!("{}/tests/fixtures/{name}.jsonl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let dir = match v["d"].as_str().unwrap() {
                "c" => Direction::ToServer,
                _ => Direction::ToClient,
            };
            (dir, hex::decode(v["hex"].as_str().unwrap()).unwrap())
        })
        .collect()
}
