//! The kernel's own fence on VIPs held under a Lease: an address added with a deadline has a
//! lifetime ending then, renewals move it on, and once nobody moves it the kernel removes the
//! address by itself — with no kvip process left to do it.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{node, state};
use kvip_dataplane::{Config, Dataplane};
use kvip_testkit::{Netns, require_kernel};

/// The valid lifetime of `address` in `ns` as `ip` reports it: `None` when forever; the test
/// fails when the address is absent or `ip` fails.
fn valid_lft(ns: &Netns, address: &str) -> Option<u64> {
    lifetimes(ns)
        .get(address)
        .copied()
        .unwrap_or_else(|| panic!("{address} is not in {ns:?}"))
}

/// Every address of `eth0` with its valid lifetime (`None`: forever).
fn lifetimes(ns: &Netns) -> BTreeMap<String, Option<u64>> {
    let out = ns
        .exec_ok("ip", &["-j", "addr", "show", "dev", "eth0"])
        .expect("ip addr");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    let mut m = BTreeMap::new();
    for link in v.as_array().expect("links") {
        for a in link["addr_info"].as_array().expect("addr_info") {
            let lft = a["valid_life_time"].as_u64().expect("valid_life_time");
            m.insert(
                a["local"].as_str().expect("local").to_string(),
                (lft != u64::from(u32::MAX)).then_some(lft),
            );
        }
    }
    m
}

const STATE: &str = r#"
vips:
  - {address: 192.0.2.10, interface: eth0}
  - {address: 192.0.2.11, interface: eth0}
  - {address: "2001:db8::10", interface: eth0}
egress:
  - {name: a/one, vip: 192.0.2.10, sources: [10.244.1.1], exclude: [10.244.0.0/16]}
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn fenced_vips_live_until_their_deadline_renewals_move_it_and_the_kernel_removes_them() {
    require_kernel!();
    let (ns, _peer) = node("fence");
    let want = state(STATE);
    let deadline = with_dataplane_at(&ns, async |dp| {
        let now = Instant::now();
        // Two VIPs under a Lease, one held without (no election).
        let fences = BTreeMap::from([
            (ip("192.0.2.10"), now + Duration::from_millis(3500)),
            (ip("2001:db8::10"), now + Duration::from_millis(3500)),
        ]);
        let r = dp.fence(fences).await.expect("fence");
        assert_eq!(r.refreshed, 0, "nothing held yet");
        dp.apply(&want).await.expect("apply");
        assert_eq!(dp.observe().await.expect("observe").state, want);
        for a in ["192.0.2.10", "2001:db8::10"] {
            assert_eq!(valid_lft(&ns, a), Some(4), "{a}: rounded up");
        }
        assert_eq!(valid_lft(&ns, "192.0.2.11"), None);
        // A renewal moves both on; the unfenced one is not touched.
        let later = Instant::now() + Duration::from_millis(9500);
        let fences = BTreeMap::from([(ip("192.0.2.10"), later), (ip("2001:db8::10"), later)]);
        let r = dp.fence(fences.clone()).await.expect("fence");
        assert_eq!(r.refreshed, 2);
        assert!(r.expired.is_empty());
        for a in ["192.0.2.10", "2001:db8::10"] {
            let l = valid_lft(&ns, a).expect("finite");
            assert!((9..=10).contains(&l), "{a}: {l}");
        }
        // The same deadlines again change nothing in the kernel.
        assert_eq!(dp.fence(fences).await.expect("fence").refreshed, 0);
        // An apply keeps the lifetimes, and the read-back still sees exactly the state.
        dp.apply(&want).await.expect("apply");
        assert_eq!(dp.observe().await.expect("observe").state, want);
        assert!(valid_lft(&ns, "192.0.2.10").is_some());
        // The last renewal: two and a half seconds left. Then the process "dies" (the
        // dataplane is dropped, nothing removes anything).
        let last = Instant::now() + Duration::from_millis(2500);
        let fences = BTreeMap::from([(ip("192.0.2.10"), last), (ip("2001:db8::10"), last)]);
        dp.fence(fences).await.expect("fence");
        last
    });
    // The kernel removes both fenced addresses by itself, less than two seconds after the
    // deadline (a lifetime rounded up to whole seconds, the kernel's timer up to a second late).
    let limit = deadline + Duration::from_millis(2000);
    loop {
        let now = lifetimes(&ns);
        if !now.contains_key("192.0.2.10") && !now.contains_key("2001:db8::10") {
            assert!(
                now.contains_key("192.0.2.11"),
                "the unfenced VIP stays: {now:?}"
            );
            break;
        }
        assert!(
            Instant::now() < limit,
            "still there past the deadline: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        Instant::now() + Duration::from_millis(500) >= deadline,
        "removed well before the deadline"
    );
}

#[test]
fn a_passed_deadline_removes_a_held_vip_and_keeps_a_new_one_out() {
    require_kernel!();
    let (ns, _peer) = node("fencex");
    let want = state(STATE);
    with_dataplane_at(&ns, async |dp| {
        let now = Instant::now();
        dp.fence(BTreeMap::from([(
            ip("192.0.2.10"),
            now + Duration::from_secs(30),
        )]))
        .await
        .expect("fence");
        dp.apply(&want).await.expect("apply");
        // Renewals stopped reaching this process: the deadline passes before its step-down.
        let r = dp
            .fence(BTreeMap::from([(ip("192.0.2.10"), Instant::now())]))
            .await
            .expect("fence");
        assert_eq!(r.expired, vec![ip("192.0.2.10")]);
        assert!(!lifetimes(&ns).contains_key("192.0.2.10"));
        // An apply under that deadline does not add it again, and says why.
        let report = dp.apply(&want).await.expect("apply");
        assert!(report.vips_added.is_empty(), "{report:?}");
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("192.0.2.10") && w.contains("renew deadline has passed")),
            "{report:?}"
        );
        assert!(!lifetimes(&ns).contains_key("192.0.2.10"));
        assert!(lifetimes(&ns).contains_key("192.0.2.11"));
    });
}

fn with_dataplane_at<T: Send>(
    ns: &Netns,
    f: impl AsyncFnOnce(&mut kvip_dataplane::KernelDataplane) -> T + Send,
) -> T {
    common::with_dataplane(
        ns,
        Config {
            announce: kvip_dataplane::AnnounceConfig {
                count: 0,
                ..Default::default()
            },
            ..Config::default()
        },
        f,
    )
}
