//! Golden files for what kvip hands the kernel: the nft JSON (full and incremental) and the
//! iptables-restore input. Regenerate with `KVIP_UPDATE_GOLDEN=1 cargo nextest run golden`
//! and review the diff: a change here is a change to what every node runs.

mod common;

use std::path::PathBuf;

use common::state;
use kvip_core::{DesiredState, Family};
use kvip_dataplane::iptables::{Chains, NatView, of_family, render_restore};
use kvip_dataplane::nft::{parse_table, render_delta, render_full};

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("KVIP_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (set KVIP_UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs from the rendering",
        path.display()
    );
}

fn sample() -> DesiredState {
    state(
        r#"
vips:
  - {address: 198.51.100.10, interface: eth0}
egress:
  - name: default/web
    vip: 198.51.100.10
    sources: [10.244.1.5, 10.244.1.6]
    exclude: [10.244.0.0/16, 10.96.0.0/12]
    allow: [203.0.113.0/24]
    ports: ["tcp:443", "udp:53"]
  - name: kube-system/dns6
    vip: "2001:db8::10"
    sources: ["fd00:10:244:1::5"]
    exclude: ["fd00:10:244::/48", "fd00:96::/108"]
"#,
    )
}

#[test]
fn nft_full() {
    let doc = render_full("kvip", &sample())
        .expect("render")
        .to_value()
        .expect("json");
    golden(
        "nft_full.json",
        &format!("{}\n", serde_json::to_string_pretty(&doc).expect("json")),
    );
}

#[test]
fn nft_delta_one_pod() {
    let before = sample();
    let after = state(
        &serde_norway::to_string(&before.to_spec())
            .expect("yaml")
            .replace("10.244.1.6", "10.244.1.7"),
    );
    let (doc, counts) = render_delta("kvip", &before, &after).expect("same structure");
    let doc = doc.to_value().expect("json");
    assert_eq!((counts.added, counts.removed), (1, 1));
    golden(
        "nft_delta.json",
        &format!("{}\n", serde_json::to_string_pretty(&doc).expect("json")),
    );
}

#[test]
fn nft_structure_change_needs_full_replace() {
    let before = sample();
    let after = state(
        &serde_norway::to_string(&before.to_spec())
            .expect("yaml")
            .replace("vip: 198.51.100.10", "vip: 198.51.100.11"),
    );
    assert!(render_delta("kvip", &before, &after).is_none());
}

#[test]
fn iptables_restore_input() {
    let s = sample();
    let chains = Chains::new("KVIP-".into());
    let v4 = render_restore(
        &chains,
        &of_family(s.egress(), Family::V4),
        &NatView::default(),
    )
    .expect("render")
    .expect("v4 input");
    let v6 = render_restore(
        &chains,
        &of_family(s.egress(), Family::V6),
        &NatView::default(),
    )
    .expect("render")
    .expect("v6 input");
    golden("iptables_v4.rules", &v4);
    golden("ip6tables_v6.rules", &v6);
}

/// The renderer's output, fed back as if the kernel listed it, parses to the same policies.
#[test]
fn nft_render_parses_back() {
    let s = sample();
    let doc = render_full("kvip", &s)
        .expect("render")
        .to_value()
        .expect("json");
    // A listing holds objects, not commands: unwrap the "add" of everything after the
    // table's add/delete/add preamble.
    let items: Vec<serde_json::Value> = doc["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .skip(3)
        .filter_map(|c| c.get("add").cloned())
        .collect();
    let parsed = parse_table(&serde_json::json!({ "nftables": items }).to_string()).expect("parse");
    assert!(parsed.stray.is_empty(), "{:?}", parsed.stray);
    assert_eq!(parsed.egress, s.egress());
}
