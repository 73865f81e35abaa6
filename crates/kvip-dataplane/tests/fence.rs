//! The kernel's own fence on VIPs held under a Lease: an address with a deadline has a
//! lifetime that never reaches past it, a keeper tops it up while the deadline lasts, and once
//! nobody does the kernel removes the address by itself — with no kvip process left to do it.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{node, state};
use kvip_dataplane::{Config, Dataplane, KernelDataplane};
use kvip_testkit::{Netns, require_kernel};

/// Every address of `eth0` with its valid lifetime in seconds (`None`: forever); the test
/// fails when `ip` does.
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

fn fenced(deadline: Instant, addrs: &[&str]) -> BTreeMap<IpAddr, Instant> {
    addrs.iter().map(|a| (ip(a), deadline)).collect()
}

fn no_announcements() -> Config {
    Config {
        announce: kvip_dataplane::AnnounceConfig {
            count: 0,
            ..Default::default()
        },
        ..Config::default()
    }
}

/// Waits (at most `limit`) until `f` holds, checking every 20 ms.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn fenced_vips_are_kept_topped_up_and_the_kernel_removes_them_once_the_process_is_gone() {
    require_kernel!();
    let (ns, _peer) = node("fence");
    let want = state(STATE);
    let deadline = common::with_dataplane(&ns, no_announcements(), async |dp| {
        let sink = dp.fence_sink().expect("fence sink");
        let far = Instant::now() + Duration::from_secs(60);
        sink.set(fenced(far, &["192.0.2.10", "2001:db8::10"]));
        dp.apply(&want).await.expect("apply");
        assert_eq!(dp.observe().await.expect("observe").state, want);
        let l = lifetimes(&ns);
        for a in ["192.0.2.10", "2001:db8::10"] {
            // Short lifetimes however far the deadline: a few seconds at most.
            let secs = l[a].expect("finite");
            assert!((1..=4).contains(&secs), "{a}: {secs}");
        }
        assert_eq!(l["192.0.2.11"], None, "held without a Lease: forever");
        // The keeper tops them up: past two whole lifetimes they are still there.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(9) {
            let l = lifetimes(&ns);
            assert!(
                l.contains_key("192.0.2.10") && l.contains_key("2001:db8::10"),
                "lapsed after {:?}: {l:?}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r = sink.set(fenced(far, &["192.0.2.10", "2001:db8::10"]));
        assert!(r.refreshed >= 2, "{r:?}");
        assert!(r.lapsed.is_empty() && r.expired == 0, "{r:?}");
        // An apply keeps the lifetimes, and the read-back still sees exactly the state.
        dp.apply(&want).await.expect("apply");
        assert_eq!(dp.observe().await.expect("observe").state, want);
        // The last renewal: 2.5 s left. The process then "dies" (the dataplane and its keeper
        // are dropped; nothing removes anything).
        let last = Instant::now() + Duration::from_millis(2500);
        sink.set(fenced(last, &["192.0.2.10", "2001:db8::10"]));
        until(
            "the keeper shortened the lifetimes",
            Duration::from_secs(3),
            || {
                let l = lifetimes(&ns);
                l["192.0.2.10"].is_some_and(|s| s <= 3) && l["2001:db8::10"].is_some_and(|s| s <= 3)
            },
        )
        .await;
        last
    });
    // The kernel removes both fenced addresses by itself, less than 1.5 s after the deadline.
    let limit = deadline + Duration::from_millis(1500);
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
}

#[test]
fn a_passed_deadline_removes_a_held_vip_and_keeps_a_new_one_out() {
    require_kernel!();
    let (ns, _peer) = node("fencex");
    let want = state(STATE);
    common::with_dataplane(&ns, no_announcements(), async |dp| {
        let sink = dp.fence_sink().expect("fence sink");
        let far = Instant::now() + Duration::from_secs(60);
        sink.set(fenced(far, &["192.0.2.10"]));
        dp.apply(&want).await.expect("apply");
        // Renewals stopped reaching this process: the deadline passes before its step-down.
        // The keeper removes the address.
        sink.set(fenced(Instant::now(), &["192.0.2.10"]));
        until("removed by the keeper", Duration::from_secs(3), || {
            !lifetimes(&ns).contains_key("192.0.2.10")
        })
        .await;
        let r = sink.set(fenced(Instant::now(), &["192.0.2.10"]));
        assert_eq!(r.expired, 1, "{r:?}");
        assert!(r.lapsed.is_empty(), "an expired VIP has not lapsed: {r:?}");
        // An apply under that deadline does not add it again, and says why.
        let report = dp.apply(&want).await.expect("apply");
        assert!(report.vips_added.is_empty(), "{report:?}");
        assert_eq!(report.vips_expired, vec![ip("192.0.2.10")]);
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("192.0.2.10") && w.contains("renew deadline has passed")),
            "{report:?}"
        );
        assert!(!lifetimes(&ns).contains_key("192.0.2.10"));
        assert!(lifetimes(&ns).contains_key("192.0.2.11"));
        // The Lease renewed after all: the next apply adds it back, which is no repair of
        // anyone's drift (kvip removed it itself).
        sink.set(fenced(
            Instant::now() + Duration::from_secs(60),
            &["192.0.2.10"],
        ));
        let report = dp.apply(&want).await.expect("apply");
        assert_eq!(report.vips_added, vec![ip("192.0.2.10")], "{report:?}");
        assert!(report.vips_repaired.is_empty(), "{report:?}");
        assert!(lifetimes(&ns).contains_key("192.0.2.10"));
    });
}

#[test]
fn a_held_vip_removed_by_hand_is_reported_and_a_foreign_one_never_touched() {
    require_kernel!();
    let (ns, _peer) = node("fencel");
    // 192.0.2.12 is configured by hand first: kvip leaves it alone although it claims it.
    ns.exec_ok("ip", &["addr", "add", "192.0.2.12/32", "dev", "eth0"])
        .expect("foreign address");
    let want = state(
        r#"
vips:
  - {address: 192.0.2.10, interface: eth0}
  - {address: 192.0.2.12, interface: eth0}
"#,
    );
    common::with_dataplane(&ns, no_announcements(), async |dp: &mut KernelDataplane| {
        let sink = dp.fence_sink().expect("fence sink");
        let far = Instant::now() + Duration::from_secs(60);
        let deadlines = fenced(far, &["192.0.2.10", "192.0.2.12"]);
        sink.set(deadlines.clone());
        let r = dp.apply(&want).await.expect("apply");
        assert_eq!(r.vips_foreign, vec![ip("192.0.2.12")]);
        // The keeper has seen it (its lifetime topped up), then someone removes it by hand.
        until("topped up", Duration::from_secs(5), || {
            lifetimes(&ns)["192.0.2.10"].is_some_and(|s| s == 4)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        ns.exec_ok("ip", &["addr", "del", "192.0.2.10/32", "dev", "eth0"])
            .expect("remove by hand");
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            // Its lifetime still ran: removed by someone (drift), not run out.
            let r = sink.set(deadlines.clone());
            assert!(r.lapsed.is_empty(), "{r:?}");
            if r.removed == vec![ip("192.0.2.10")] {
                break;
            }
            assert!(r.removed.is_empty(), "{r:?}");
            assert!(Instant::now() < end, "not reported removed: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The keeper did not put it back (it never creates an address) ...
        assert!(!lifetimes(&ns).contains_key("192.0.2.10"));
        // ... and never touched the foreign one, deadline or not.
        sink.set(fenced(Instant::now(), &["192.0.2.12"]));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(lifetimes(&ns).get("192.0.2.12"), Some(&None));
    });
}

/// A renewal less than a second after the address was written (the agent's first renewal
/// after it takes a Lease comes a retry period after the acquisition, and the address was
/// added a little after that) moves the deadline while the kernel still reads the whole
/// lifetime: the address must then last until the new deadline, not lapse at the old one.
/// While it looks, the test keeps replacing an address of its own, which makes the kernel
/// check lifetimes at once each time (otherwise it does so only at whole seconds), so an
/// address that runs out is gone within milliseconds. Two rounds, each with a VIP of its own.
#[test]
fn a_renewal_within_a_second_of_the_write_keeps_the_vip_to_its_new_deadline() {
    require_kernel!();
    let (ns, _peer) = node("fencer");
    common::with_dataplane(&ns, no_announcements(), async |dp: &mut KernelDataplane| {
        let sink = dp.fence_sink().expect("fence sink");
        let mut deadlines = BTreeMap::new();
        let mut vips = String::from("vips:\n");
        for round in 0..2 {
            let vip = format!("192.0.2.{}", 20 + round);
            vips.push_str(&format!("  - {{address: {vip}, interface: eth0}}\n"));
            deadlines.insert(ip(&vip), Instant::now() + Duration::from_secs(2));
            sink.set(deadlines.clone());
            dp.apply(&state(&vips)).await.expect("apply");
            assert_eq!(lifetimes(&ns)[&vip], Some(2), "written with 2 s");
            tokio::time::sleep(Duration::from_millis(850)).await;
            // The renewal: 2 s from now.
            let renewed = Instant::now() + Duration::from_secs(2);
            deadlines.insert(ip(&vip), renewed);
            sink.set(deadlines.clone());
            // Present until shortly before the new deadline (the kernel removes an address
            // up to 20 ms early).
            while Instant::now() + Duration::from_millis(100) < renewed {
                ns.exec_ok("ip", &["addr", "replace", "192.0.2.99/32", "dev", "eth0"])
                    .expect("the test's own address");
                assert!(
                    lifetimes(&ns).contains_key(&vip),
                    "{vip} lapsed {:?} before its deadline",
                    renewed.saturating_duration_since(Instant::now())
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let r = sink.set(deadlines.clone());
            assert!(r.lapsed.is_empty() && r.removed.is_empty(), "{r:?}");
            // Done with this one: no deadline, nothing more to keep.
            deadlines.remove(&ip(&vip));
        }
    });
}
