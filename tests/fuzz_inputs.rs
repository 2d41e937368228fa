//! The fuzz entry points (`whereabouts::fuzz`, also run by cargo-fuzz from `fuzz/` on nightly)
//! driven by a seeded mutation loop, so every test run covers them for a bounded time.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\n",
    b"\\u0000",
    b"null",
    b"true",
    b"-1",
    b"1e400",
    b"18446744073709551616",
    b"\"range\"",
    b"\"ipRanges\"",
    b"\"exclude\"",
    b"\"/dev/zero\"",
    b"\"../../etc/shadow\"",
    b"\"10.0.0.0/8\"",
    b"\"::/0\"",
    b"\"fd00::/127\"",
    b"\"255.255.255.255\"",
    b"\"local_path\"",
    b"\"log_file\"",
    b"\"kubernetes\"",
    b"CNI_ARGS=",
    b"IP=",
    b";",
    b"=",
];

const CONFIG_SEEDS: &[&str] = &[
    r#"{"type":"whereabouts","range":"192.168.1.5-192.168.1.25/24","gateway":"192.168.1.1"}"#,
    r#"{"type":"whereabouts","ipRanges":[{"range":"fd00::/64","exclude":["fd00::1"]},{"range":"10.0.0.0/30"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.0.0.1"}]}"#,
    r#"{"type":"whereabouts","range":"10.0.0.0/24","addresses":[{"address":"10.0.0.9/24"}],"dns":{"nameservers":["1.1.1.1"]},"log_file":"/tmp/x","node_slice_size":"/26"}"#,
    r#"{"type":"whereabouts","range":"10.0.0.0/24","datastore":"etcd","etcd_host":"https://h:1","etcd_username":"u","kubernetes":{"kubeconfig":"/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"}}"#,
];

const REQUEST_SEEDS: &[&str] = &[
    "CNI_COMMAND=ADD\nCNI_CONTAINERID=c\nCNI_IFNAME=eth0\nCNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.0.0.5\n\n{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"ipam\":{\"type\":\"whereabouts\",\"range\":\"10.0.0.0/24\"},\"runtimeConfig\":{\"ips\":[\"10.0.0.7/24\"]}}",
    "CNI_COMMAND=GC\n\n{\"cniVersion\":\"1.1.0\",\"cniVersions\":[\"1.0.0\"],\"name\":\"n\",\"cni.dev/valid-attachments\":[{\"containerID\":\"c\",\"ifname\":\"eth0\"}],\"args\":{\"cni\":{\"ips\":[\"fd00::5\"]}}}",
];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=input.len());
        match rng.random_range(0..6) {
            0 if !input.is_empty() => {
                let i = rng.random_range(0..input.len());
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 => input.insert(at, rng.random()),
            2 if at < input.len() => {
                let end = rng.random_range(at..=input.len().min(at + 16));
                input.drain(at..end);
            }
            3 => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            4 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..other.len());
                let to = rng.random_range(from..=other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ if at < input.len() => {
                let end = rng.random_range(at..=input.len().min(at + 32));
                let chunk = input[at..end].to_vec();
                input.splice(at..at, chunk);
            }
            _ => {}
        }
    }
}

/// Runs `target` on the seeds and `rounds` mutants of them.
fn drive(seed: u64, seeds: &[&str], rounds: usize, target: fn(&[u8])) {
    let seeds: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    for seed in &seeds {
        target(seed);
    }
    for _ in 0..rounds {
        let mut input = seeds[rng.random_range(0..seeds.len())].clone();
        mutate(&mut rng, &seeds, &mut input);
        target(&input);
    }
}

#[test]
fn config_parsing_never_panics() {
    drive(1, CONFIG_SEEDS, 20_000, whereabouts::fuzz::config);
}

#[test]
fn request_parsing_never_panics() {
    drive(2, REQUEST_SEEDS, 20_000, whereabouts::fuzz::request);
}

/// Runs `target` on 20,000 random byte strings shorter than `max_len`.
fn random_bytes(seed: u64, max_len: usize, target: fn(&[u8])) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..20_000 {
        let len = rng.random_range(0..max_len);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        target(&bytes);
    }
}

#[test]
fn the_choice_is_always_the_lowest_free_address() {
    random_bytes(3, 64, whereabouts::fuzz::decide);
}

#[test]
fn node_slices_are_always_a_sound_assignment() {
    random_bytes(4, 96, whereabouts::fuzz::slices);
}

#[test]
fn the_etcd_doctor_reports_exactly_the_faults_a_walk_finds() {
    random_bytes(5, 256, whereabouts::fuzz::etcd_doctor);
}

#[test]
fn the_kubernetes_doctor_reports_exactly_what_the_entries_say() {
    random_bytes(7, 192, whereabouts::fuzz::k8s_doctor);
}

#[test]
fn ippool_keys_and_offsets_always_agree() {
    random_bytes(6, 160, whereabouts::fuzz::pool_keys);
}
