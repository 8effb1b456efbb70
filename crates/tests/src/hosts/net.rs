//! Network namespaces as "hosts": one Linux bridge per test in the root namespace, and one
//! namespace per host (control has its own too) joined to it by a veth pair.
//!
//! ```text
//!   root netns: bridge trb<tag> 10.a.b.1/24  (fio, the checker, REST clients live here)
//!      ├── trv<tag>c ══ eth0 in trn<tag>-c   10.a.b.2   control
//!      ├── trv<tag>0 ══ eth0 in trn<tag>-0   10.a.b.10  engine node-0
//!      └── trv<tag>1 ══ eth0 in trn<tag>-1   10.a.b.11  engine node-1 …
//! ```
//!
//! `<tag>` is the test process's pid plus a per-process counter letter, so two tests (two
//! processes under nextest) never collide, and a later test can tell that resources named after
//! a dead pid are leftovers of a killed run ([`sweep_stale`]). Interface names stay within
//! Linux's 15 characters. Control lives in its own namespace so a host can be cut off from
//! control alone (a blackhole route) while clients in the root namespace still reach it.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefixes of everything this module creates.
const BRIDGE: &str = "trb";
const VETH: &str = "trv";
const NETNS: &str = "trn";

/// Runs a command and returns stdout, or a full description of the failure.
pub fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{program} {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Like [`sh`], panicking on failure (setup steps).
pub(crate) fn sh_ok(program: &str, args: &[&str]) -> String {
    sh(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Cleanup: failures are printed, never fatal.
pub(crate) fn sh_quiet(program: &str, args: &[&str]) -> bool {
    match sh(program, args) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("cleanup: {e}");
            false
        }
    }
}

/// A unique tag for this process's next topology: `<pid><letter>`.
pub(crate) fn next_tag() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let letter = char::from(b'a' + (n % 26) as u8);
    format!("{}{letter}", std::process::id())
}

/// The pid encoded in a tag (or a name that starts with one after its prefix).
fn tag_pid(rest: &str) -> Option<u32> {
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// One test's network: the bridge, its subnet, and the namespaces created so far.
#[derive(Debug)]
pub struct Net {
    pub tag: String,
    pub bridge: String,
    /// The first two octets after 10: the subnet is `10.a.b.0/24`.
    pub subnet: (u8, u8),
    /// (namespace, root-side veth) of every host created.
    namespaces: Vec<(String, String)>,
}

impl Net {
    /// Creates the bridge with `10.a.b.1/24` on a subnet no interface on the machine uses.
    pub fn create() -> Net {
        sweep_stale();
        let tag = next_tag();
        let bridge = format!("{BRIDGE}{tag}");
        assert!(bridge.len() <= 15, "bridge name {bridge} is too long");
        let subnet = free_subnet(&tag);
        let net = Net { tag, bridge, subnet, namespaces: Vec::new() };
        sh_ok("ip", &["link", "add", &net.bridge, "type", "bridge"]);
        sh_ok("ip", &["addr", "add", &format!("{}/24", net.addr(1)), "dev", &net.bridge]);
        sh_ok("ip", &["link", "set", &net.bridge, "up"]);
        net
    }

    /// `10.a.b.<last>`.
    pub fn addr(&self, last: u8) -> String {
        format!("10.{}.{}.{last}", self.subnet.0, self.subnet.1)
    }

    /// The namespace name of host `id` (`c` for control, a number for engines).
    pub fn netns(&self, id: &str) -> String {
        format!("{NETNS}{}-{id}", self.tag)
    }

    /// The root-side veth name of host `id`.
    pub fn veth(&self, id: &str) -> String {
        let v = format!("{VETH}{}{id}", self.tag);
        assert!(v.len() <= 15, "veth name {v} is too long");
        v
    }

    /// Creates namespace `id` with `eth0` at `10.a.b.<last>/24` on the bridge, and loopback up.
    pub fn add_host(&mut self, id: &str, last: u8) -> String {
        let ns = self.netns(id);
        let veth = self.veth(id);
        sh_ok("ip", &["netns", "add", &ns]);
        self.namespaces.push((ns.clone(), veth.clone()));
        sh_ok("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        sh_ok("ip", &["link", "set", &veth, "master", &self.bridge]);
        sh_ok("ip", &["link", "set", &veth, "up"]);
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &ns, "ip"];
            full.extend_from_slice(args);
            sh_ok("ip", &full);
        };
        in_ns(&["addr", "add", &format!("{}/24", self.addr(last)), "dev", "eth0"]);
        in_ns(&["link", "set", "eth0", "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        ns
    }

    /// Takes host `id`'s link down (root side): nothing reaches it, it reaches nothing.
    pub fn cut(&self, id: &str) {
        sh_ok("ip", &["link", "set", &self.veth(id), "down"]);
    }

    pub fn heal(&self, id: &str) {
        sh_ok("ip", &["link", "set", &self.veth(id), "up"]);
    }

    /// Inside host `id`, drops everything addressed to `addr` (both directions of any TCP
    /// connection die: the host's packets to `addr` vanish, including its replies).
    pub fn blackhole(&self, id: &str, addr: &str) {
        sh_ok(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns(id),
                "ip",
                "route",
                "add",
                "blackhole",
                &format!("{addr}/32"),
            ],
        );
    }

    pub fn unblackhole(&self, id: &str, addr: &str) {
        sh_ok(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns(id),
                "ip",
                "route",
                "del",
                "blackhole",
                &format!("{addr}/32"),
            ],
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The kernel destroys a deleted namespace's interfaces asynchronously; deleting the
        // root side of each pair first makes the teardown complete when Drop returns.
        for (ns, veth) in self.namespaces.drain(..) {
            sh_quiet("ip", &["link", "del", &veth]);
            sh_quiet("ip", &["netns", "del", &ns]);
        }
        sh_quiet("ip", &["link", "del", &self.bridge]);
    }
}

/// A `10.a.b.0/24` no address on the machine is in, derived from the tag (a in 64..128).
fn free_subnet(tag: &str) -> (u8, u8) {
    let used = sh("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default();
    let mut h: u32 = 2166136261;
    for b in tag.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    for i in 0..16384u32 {
        let v = h.wrapping_add(i.wrapping_mul(7919)) % 16384;
        let (a, b) = (64 + (v / 256) as u8, (v % 256) as u8);
        if !used.contains(&format!(" 10.{a}.{b}.")) {
            return (a, b);
        }
    }
    panic!("no free 10.64-127.x.0/24 subnet");
}

/// Removes namespaces and bridges left by test processes that no longer exist (a test killed
/// by its runner never runs Drop).
pub fn sweep_stale() {
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            if let Some(rest) = name.strip_prefix(NETNS)
                && let Some(pid) = tag_pid(rest)
                && !pid_alive(pid)
            {
                sh_quiet("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(list) = sh("ip", &["-o", "link", "show"]) {
        for line in list.lines() {
            // "12: trb1234a: <BROADCAST…" or "13: trv1234a0@if2: …"
            let Some(name) = line.split(':').nth(1).map(str::trim) else { continue };
            let name = name.split('@').next().unwrap_or(name);
            for prefix in [BRIDGE, VETH] {
                if let Some(rest) = name.strip_prefix(prefix)
                    && let Some(pid) = tag_pid(rest)
                    && !pid_alive(pid)
                {
                    sh_quiet("ip", &["link", "del", name]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_names_fit() {
        let a = next_tag();
        let b = next_tag();
        assert_ne!(a, b);
        assert_eq!(tag_pid(&a), Some(std::process::id()));
        // The longest pid Linux hands out has 7 digits: names must still fit in 15 characters.
        let net = Net {
            tag: "4194304z".into(),
            bridge: String::new(),
            subnet: (64, 0),
            namespaces: Vec::new(),
        };
        assert!(net.veth("c").len() <= 15);
        assert!(net.veth("9").len() <= 15);
        assert_eq!(net.addr(10), "10.64.0.10");
        std::mem::forget(net);
    }
}
