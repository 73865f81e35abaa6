//! A long-lived dataplane (the agent) notices through the instance's lock that another
//! process changed the kernel, and replaces everything on its next apply instead of trusting
//! what it remembers.

mod common;

use common::{backends, state};
use kvip_dataplane::{Dataplane, KernelDataplane, SyncMode};
use kvip_testkit::{Netns, require_kernel};

#[test]
fn an_apply_by_another_process_is_not_mistaken_for_ours() {
    require_kernel!();
    let a = state(
        r#"
vips: [{address: 192.0.2.10, interface: eth0}]
egress:
  - {name: x/one, vip: 192.0.2.10, sources: [10.244.1.1, 10.244.1.2], exclude: [10.244.0.0/16]}
"#,
    );
    let b = state(
        r#"
vips: [{address: 192.0.2.11, interface: eth0}]
egress:
  - {name: x/two, vip: 192.0.2.11, sources: [10.244.2.1], exclude: []}
"#,
    );
    for (name, cfg) in backends() {
        let ns = Netns::new("lkw").expect("netns");
        let peer = Netns::new("lkwp").expect("netns");
        ns.veth("eth0", &peer, "eth0").expect("veth");
        ns.block_on(|| async {
            let mut agent = KernelDataplane::new(cfg.clone()).await.expect("open");
            agent.apply(&a).await.expect("apply A");
            // Another writer (its own lock token) replaces A with B.
            let mut other = KernelDataplane::new(cfg.clone()).await.expect("open");
            other.apply(&b).await.expect("apply B");
            // The agent applies A again: it must not take A for what the kernel holds.
            let r = agent.apply(&a).await.expect("apply A again");
            assert_ne!(r.mode, SyncMode::Unchanged, "{name}: {r:?}");
            assert_eq!(agent.observe().await.expect("observe").state, a, "{name}");
            // Its own applies alone keep the fast path.
            let r = agent.apply(&a).await.expect("apply A a third time");
            assert_eq!(r.mode, SyncMode::Unchanged, "{name}");
        })
        .expect("netns");
    }
}
