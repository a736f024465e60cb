//! Arbitrary bytes from a client and from a server, in arbitrary interleavings, through
//! the inline proxy's per-connection state machine under an enforce policy that blocks
//! masks and holds for approval (holds end approved or refused as the input says): it
//! never panics, and what it writes to either side stays bounded by what it
//! was given (a refusal replaces a message with a small one of its own; a catalog read
//! for masking follows a ReadyForQuery; a masked value is at most a few dozen bytes).
#![no_main]

use std::{path::Path, sync::Arc};

use auditor::{
    pg::{BufferBudget, TokenizerLimits},
    policy::{load::load_str, load::LintReport, Defaults, PolicySet, Subject},
    proxy::relay::{HoldEnd, Relay},
};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = "name: f\nselector: {}\nmode: enforce\nblock:\n  - name: ddl\n    when: {ddl: true}\n  - name: files\n    when: {functions: [pg_read_file]}\n  - name: unbounded\n    when: {without_where: true}\nrequire_approval:\n  - name: deletes\n    when: {commands: [DELETE]}\nmask:\n  - name: m\n    columns: [t.c, s.*.d]\n    using: email\n  - name: found\n    detectors: [email, card_number, iban]\n    patterns: [\"K-[0-9]+\"]\n";

static APPLIED: std::sync::OnceLock<Arc<auditor::policy::Applied>> = std::sync::OnceLock::new();

fn applied() -> Arc<auditor::policy::Applied> {
    APPLIED
        .get_or_init(|| {
            let mut report = LintReport::default();
            let set = Arc::new(PolicySet::new(load_str(
                Path::new("f.yaml"),
                POLICY,
                &mut report,
            )));
            let labels = std::collections::BTreeMap::new();
            Arc::new(set.resolve(
                &Subject {
                    labels: &labels,
                    db_user: "u",
                    database: "d",
                    application_name: "",
                    client_addr: None,
                    server_addr: None,
                    server_port: 5432,
                },
                Defaults::default(),
            ))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let applied = applied();
    let limits = TokenizerLimits { max_buffered: 4096 };
    let mut relay = Relay::new(
        limits,
        BufferBudget::new(1 << 20),
        Box::new(move |_| applied.clone()),
    );
    let (mut client_in, mut server_in) = (0usize, 0usize);
    let (mut to_server, mut to_client, mut refused) = (0usize, 0usize, 0usize);
    let mut extra = 0usize;
    let mut rest = data;
    // Records: [flags][len][bytes]: flags bit 0 direction (0: from the client).
    while let [flags, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        if flags & 1 == 0 {
            client_in += chunk.len();
            relay.on_client(chunk);
        } else {
            server_in += chunk.len();
            relay.on_server(chunk);
        }
        // Flags bits 1-3: a hold's end (approved, refused) and keepalives.
        if relay.hold_asked.take().is_some() {
            relay.notice("held", Some("detail"), None);
            extra += 128;
        }
        if relay.holding() && flags & 6 != 0 {
            if flags & 2 != 0 {
                relay.end_hold(HoldEnd::Approved);
            } else {
                relay.end_hold(HoldEnd::Refused {
                    sqlstate: "42501",
                    message: "denied".into(),
                    detail: None,
                });
            }
        }
        if flags & 8 != 0 {
            relay.keepalive();
            extra += 6;
        }
        refused += relay.refused.len();
        relay.refused.clear();
        to_server += relay.to_server.len();
        to_client += relay.to_client.len();
        relay.to_server.clear();
        relay.to_client.clear();
        assert!(
            to_server <= client_in + 128 * refused + 4096 * (server_in / 6 + 1) + extra,
            "{to_server} > {client_in}"
        );
        assert!(
            to_client <= 16 * server_in + 256 * (refused + 1) + client_in + extra,
            "{to_client} > {server_in}"
        );
        if relay.closed() {
            break;
        }
    }
});
