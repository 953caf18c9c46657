#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One registry file, two writers: devices the simulator provisions straight into the file are
//! read and verified by the gateway's `DeviceRegistry`, and devices the gateway adds survive the
//! simulator's next provisioning (both go through `thalamus-registry`). No processes.

use thalamus_ingress::registry::{DeviceRegistry, Verdict};
use thalamus_sim::provision::{provision_registry, ProvisionRequest};

fn request(first: u32, count: u32, secret: &str) -> ProvisionRequest {
    ProvisionRequest {
        prefix: "load-".into(),
        first,
        count,
        secret: secret.into(),
    }
}

#[test]
fn the_gateway_verifies_devices_the_simulator_provisioned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("devices.toml");
    let secret = thalamus_sim::provision::generate_secret();
    assert_eq!(
        provision_registry(&path, &request(0, 3, &secret)).unwrap(),
        3
    );

    let gateway = DeviceRegistry::open(&path);
    gateway.refresh().unwrap();
    assert_eq!(gateway.ids(), ["load-0", "load-1", "load-2"]);
    assert_eq!(gateway.verify("load-2", &secret).unwrap(), Verdict::Valid);
    assert_eq!(
        gateway.verify("load-0", "not the secret").unwrap(),
        Verdict::WrongSecret
    );
    assert_eq!(
        gateway.verify("load-3", &secret).unwrap(),
        Verdict::UnknownDevice
    );

    // The gateway adds one of its own; the simulator then provisions more into the same file.
    let own = gateway.add("earpiece-1").unwrap();
    assert_eq!(
        provision_registry(&path, &request(3, 2, &secret)).unwrap(),
        2
    );
    assert!(provision_registry(&path, &request(0, 1, &secret)).is_err());

    let restarted = DeviceRegistry::open(&path);
    restarted.refresh().unwrap();
    assert_eq!(restarted.len(), 6);
    assert_eq!(
        restarted.verify("earpiece-1", &own).unwrap(),
        Verdict::Valid
    );
    assert_eq!(restarted.verify("load-4", &secret).unwrap(), Verdict::Valid);
    assert_eq!(
        restarted.verify("earpiece-1", &secret).unwrap(),
        Verdict::WrongSecret
    );
}
