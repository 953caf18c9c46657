//! Properties of the ownership function over N = 2..=16 nodes and 10,000 device ids: removing
//! one node moves only that node's devices (spread over the survivors), adding one takes devices
//! only to itself, and the split is close to even.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use thalamus_ownership::{owner, NodeId};

const KEYS: usize = 10_000;
/// Largest relative deviation of a node's share from 1/N that the test accepts (12 % of the
/// even share: about 3 standard deviations at N = 16 with 10,000 keys, far more at small N).
const MAX_RELATIVE_DEVIATION: f64 = 0.12;

fn nodes(n: usize) -> Vec<NodeId> {
    (1..=n)
        .map(|i| NodeId::new(&format!("gw-{i}")).unwrap())
        .collect()
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("earpiece-{i:05}")).collect()
}

fn owners<'a>(keys: &[String], nodes: &'a [NodeId]) -> Vec<&'a NodeId> {
    keys.iter().map(|k| owner(k, nodes).unwrap()).collect()
}

#[test]
fn removing_one_of_n_nodes_moves_only_that_nodes_devices() {
    let keys = keys();
    for n in 2..=16 {
        let all = nodes(n);
        let before = owners(&keys, &all);
        for removed in &all {
            let survivors: Vec<NodeId> = all.iter().filter(|x| *x != removed).cloned().collect();
            let after = owners(&keys, &survivors);
            let mut received: BTreeMap<&NodeId, usize> = BTreeMap::new();
            let mut moved = 0;
            for (i, key) in keys.iter().enumerate() {
                if before[i] == removed {
                    assert_ne!(after[i], removed);
                    *received.entry(after[i]).or_default() += 1;
                    moved += 1;
                } else {
                    assert_eq!(
                        after[i], before[i],
                        "N={n}: removing {removed} moved {key} from {}",
                        before[i]
                    );
                }
            }
            assert!(moved > 0, "N={n}: {removed} owned nothing");
            // The removed node's devices spread over the survivors rather than landing on one.
            if n >= 3 {
                assert_eq!(
                    received.len(),
                    n - 1,
                    "N={n}: {removed}'s devices went to {received:?}"
                );
                let fair = moved as f64 / (n - 1) as f64;
                let most = *received.values().max().unwrap() as f64;
                assert!(
                    most < fair * 2.0 + 20.0,
                    "N={n}: {removed}'s devices too concentrated: {received:?}"
                );
            }
        }
    }
}

#[test]
fn adding_a_node_takes_devices_only_to_itself() {
    let keys = keys();
    for n in 2..=16 {
        let all = nodes(n);
        let before = owners(&keys, &all[..n - 1]);
        let after = owners(&keys, &all);
        let newcomer = &all[n - 1];
        let mut taken = 0;
        for i in 0..keys.len() {
            if after[i] != before[i] {
                assert_eq!(after[i], newcomer, "N={n}: {} moved elsewhere", keys[i]);
                taken += 1;
            }
        }
        let share = taken as f64 / KEYS as f64;
        let even = 1.0 / n as f64;
        assert!(
            (share - even).abs() / even <= MAX_RELATIVE_DEVIATION,
            "N={n}: newcomer took {share:.4}, even is {even:.4}"
        );
    }
}

#[test]
fn the_split_is_within_a_few_percent_of_even() {
    let keys = keys();
    let mut worst: f64 = 0.0;
    for n in 2..=16 {
        let all = nodes(n);
        let mut count: BTreeMap<&NodeId, usize> = BTreeMap::new();
        for o in owners(&keys, &all) {
            *count.entry(o).or_default() += 1;
        }
        assert_eq!(count.len(), n, "N={n}: some node owns nothing");
        let even = KEYS as f64 / n as f64;
        for (node, c) in &count {
            let deviation = (*c as f64 - even).abs() / even;
            worst = worst.max(deviation);
            assert!(
                deviation <= MAX_RELATIVE_DEVIATION,
                "N={n}: {node} owns {c} of {KEYS}, even is {even:.0}"
            );
            // In shares of all devices: within one percentage point of 1/N.
            let share_gap = (*c as f64 - even).abs() / KEYS as f64;
            assert!(
                share_gap <= 0.01,
                "N={n}: {node} share off by {share_gap:.4}"
            );
        }
    }
    println!("largest relative deviation from an even split: {worst:.3}");
}

#[test]
fn the_choice_does_not_depend_on_order() {
    let keys = keys();
    let all = nodes(9);
    let mut shuffled = all.clone();
    shuffled.rotate_left(4);
    shuffled.swap(0, 7);
    assert_eq!(owners(&keys, &all), owners(&keys, &shuffled));
}
