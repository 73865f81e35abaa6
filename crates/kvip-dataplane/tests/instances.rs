//! Instances in one namespace never touch each other's VIPs, including instances whose names
//! older kvip versions mapped to the same address protocol.

mod common;

use std::collections::BTreeSet;

use common::{state, with_dataplane};
use kvip_core::DesiredState;
use kvip_dataplane::{Config, Dataplane, Instance};
use kvip_testkit::{Netns, require_kernel};

fn instance(name: &str) -> Instance {
    Instance::new((name != "default").then_some(name)).expect("instance name")
}

fn cfg(name: &str) -> Config {
    Config {
        instance: instance(name),
        ..Config::default()
    }
}

/// Names whose legacy (hashed) protocols collide pairwise, found among short names.
fn colliding_names(pairs: usize) -> Vec<(String, String)> {
    let mut seen: std::collections::BTreeMap<u8, String> = Default::default();
    let mut out = Vec::new();
    for n in (0..2000).map(|i| format!("n{i}")) {
        let p = instance(&n).legacy_address_protocol();
        match seen.get(&p) {
            Some(first) => out.push((first.clone(), n)),
            None => {
                seen.insert(p, n);
            }
        }
        if out.len() == pairs {
            break;
        }
    }
    out
}

fn vips_state(i: u8, round: u8) -> DesiredState {
    let a = 10 + i * 4 + round;
    state(&format!(
        "vips: [{{address: 192.0.2.{a}, interface: eth0}}, {{address: \"2001:db8:1::{a}\", interface: eth0}}]"
    ))
}

fn addresses(ns: &Netns) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(&common::list(
        ns,
        "ip",
        &["-j", "addr", "show", "dev", "eth0"],
    ))
    .expect("ip json");
    v[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn instances_never_remove_each_others_vips() {
    require_kernel!();
    assert_eq!(
        instance("blue").legacy_address_protocol(),
        instance("stage").legacy_address_protocol(),
        "blue and stage must collide under the old scheme for this test to mean anything"
    );
    let mut names: Vec<String> = ["default", "blue", "stage", "bluegree"]
        .map(String::from)
        .to_vec();
    for (a, b) in colliding_names(3) {
        names.push(a);
        names.push(b);
    }
    let ns = Netns::new("inst").expect("netns");
    let peer = Netns::new("instp").expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    let mut expected: Vec<DesiredState> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let s = vips_state(i as u8, 0);
        with_dataplane(&ns, cfg(n), async |dp| dp.apply(&s).await.expect("apply"));
        expected.push(s);
    }
    let check_all = |expected: &[DesiredState], step: &str| {
        for (n, s) in names.iter().zip(expected) {
            let o = with_dataplane(&ns, cfg(n), async |dp| dp.observe().await.expect("observe"));
            assert_eq!(o.state, *s, "{n} after {step}");
        }
        let want: BTreeSet<String> = expected
            .iter()
            .flat_map(|s| s.vips().iter().map(|v| v.address.to_string()))
            .collect();
        let held: BTreeSet<String> = addresses(&ns)
            .into_iter()
            .filter(|a| !a.starts_with("fe80"))
            .collect();
        assert_eq!(held, want, "addresses after {step}");
    };
    check_all(&expected, "every instance applied");
    // Each instance in turn moves to other VIPs, then tears down: the others keep theirs.
    for (i, n) in names.iter().enumerate() {
        let s = vips_state(i as u8, 1);
        with_dataplane(&ns, cfg(n), async |dp| dp.apply(&s).await.expect("apply"));
        expected[i] = s;
        check_all(&expected, &format!("{n} moved"));
    }
    for (i, n) in names.iter().enumerate() {
        let r = with_dataplane(&ns, cfg(n), async |dp| dp.teardown().await);
        assert!(r.errors.is_empty(), "{n}: {:?}", r.errors);
        expected[i] = DesiredState::empty();
        check_all(&expected, &format!("{n} tore down"));
    }
}

#[test]
fn an_address_held_by_another_instance_is_left_alone() {
    require_kernel!();
    let ns = Netns::new("shar").expect("netns");
    let peer = Netns::new("sharp").expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    let s = vips_state(0, 0);
    with_dataplane(&ns, cfg("blue"), async |dp| {
        dp.apply(&s).await.expect("apply")
    });
    let r = with_dataplane(&ns, cfg("stage"), async |dp| {
        dp.apply(&s).await.expect("apply")
    });
    assert!(r.vips_added.is_empty(), "{r:?}");
    assert_eq!(
        r.warnings.len(),
        2,
        "one warning per VIP already held: {r:?}"
    );
    let o = with_dataplane(&ns, cfg("stage"), async |dp| {
        let r = dp.teardown().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        dp.observe().await.expect("observe")
    });
    assert!(o.state.vips().is_empty(), "{o:?}");
    let o = with_dataplane(&ns, cfg("blue"), async |dp| {
        dp.observe().await.expect("observe")
    });
    assert_eq!(o.state, s, "stage's teardown removed blue's VIPs");
    // An unmarked address (configured by hand) is left alone the same way.
    ns.addr("eth0", "192.0.2.99/32").expect("addr");
    let hand = state("vips: [{address: 192.0.2.99, interface: eth0}]");
    let r = with_dataplane(&ns, cfg("default"), async |dp| {
        let r = dp.apply(&hand).await.expect("apply");
        dp.teardown().await;
        r
    });
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(addresses(&ns).contains("192.0.2.99"));
}
