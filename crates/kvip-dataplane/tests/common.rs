//! Helpers shared by the kernel tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use kvip_core::DesiredState;
use kvip_dataplane::{BackendKind, Config, Dataplane, KernelDataplane, Variant};
use kvip_testkit::Netns;

/// Parses a state from YAML (test fixtures are written the way operators write state files).
pub fn state(yaml: &str) -> DesiredState {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("fixture state is invalid: {e}\n{yaml}"))
}

/// A node namespace with an `eth0` whose peer is in a namespace of its own (kept alive by
/// the second handle: dropping it removes `eth0`).
pub fn node(tag: &str) -> (Netns, Netns) {
    let ns = Netns::new(tag).expect("netns");
    let peer = Netns::new(&format!("{tag}p")).expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    (ns, peer)
}

/// The backends every behavioural test runs on.
pub fn backends() -> Vec<(&'static str, Config)> {
    vec![
        (
            "nftables",
            Config {
                backend: BackendKind::Nftables,
                ..Config::default()
            },
        ),
        (
            "iptables-nft",
            Config {
                backend: BackendKind::Iptables,
                iptables_variant: Some(Variant::Nft),
                ..Config::default()
            },
        ),
        (
            "iptables-legacy",
            Config {
                backend: BackendKind::Iptables,
                iptables_variant: Some(Variant::Legacy),
                ..Config::default()
            },
        ),
    ]
}

/// Runs `f` with a dataplane opened inside `ns`.
pub fn with_dataplane<T: Send>(
    ns: &Netns,
    cfg: Config,
    f: impl AsyncFnOnce(&mut KernelDataplane) -> T + Send,
) -> T {
    ns.block_on(move || async move {
        let mut dp = KernelDataplane::new(cfg).await.expect("open dataplane");
        let out = f(&mut dp).await;
        dp.wait_announcements().await;
        out
    })
    .expect("enter namespace")
}

/// Applies a state in `ns` with a fresh dataplane and returns the observed state.
pub fn apply_and_observe(ns: &Netns, cfg: Config, s: &DesiredState) -> kvip_dataplane::Observed {
    with_dataplane(ns, cfg, async |dp| {
        dp.apply(s).await.expect("apply");
        dp.observe().await.expect("observe")
    })
}

/// Everything kvip could own in a namespace, as text: nft ruleset, both iptables variants of
/// both families (nat and mangle), and addresses with their protocol.
pub fn kernel_listing(ns: &Netns) -> String {
    let mut out = String::new();
    let strip = |s: String| -> String {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                // Counters change with traffic; they are not state.
                match (l.starts_with(':'), l.rfind(" [")) {
                    (true, Some(i)) => l[..i].to_string(),
                    _ => l.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    out.push_str(&list(ns, "nft", &["list", "ruleset"]));
    for cmd in [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ] {
        out.push_str(&format!("== {cmd}\n"));
        out.push_str(&strip(list(ns, cmd, &[])));
        out.push('\n');
    }
    // A link-local address is "tentative" until duplicate address detection ends, a
    // second or so after the link comes up: the kernel's doing, not state.
    let addrs = list(ns, "ip", &["-d", "addr", "show"]);
    out.push_str(&addrs.replace(" tentative", ""));
    out
}

/// Runs a listing tool inside `ns` and returns its output; the test fails with the tool's
/// error when it cannot run or exits non-zero (an empty listing would hide the failure).
pub fn list(ns: &Netns, cmd: &str, args: &[&str]) -> String {
    ns.exec_ok(cmd, args)
        .unwrap_or_else(|e| panic!("listing failed: {e}"))
}

/// `nft <args> list table inet <table>`: empty when the table does not exist; the test fails
/// on any other error of `nft`.
pub fn nft_table(ns: &Netns, args: &[&str], table: &str) -> String {
    let mut full = args.to_vec();
    full.extend_from_slice(&["list", "table", "inet", table]);
    let out = ns
        .exec("nft", &full)
        .unwrap_or_else(|e| panic!("cannot run nft: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else if stderr.contains("No such file or directory") {
        String::new()
    } else {
        panic!("nft {full:?} failed ({}): {stderr}", out.status)
    }
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether anything kvip owns is present in the namespace.
pub fn kvip_objects(ns: &Netns) -> Vec<String> {
    kernel_listing(ns)
        .lines()
        .filter(|l| l.contains("table inet kvip") || l.contains("KVIP-") || l.contains("proto 107"))
        .map(str::to_string)
        .collect()
}
