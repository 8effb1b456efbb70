//! Process inspection through /proc: which processes a `trireme up` started, whether they are
//! still alive, and killing them. The harness uses this as ground truth rather than trusting
//! the supervisor under test to report its own children.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A process as seen in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub args: Vec<String>,
}

/// Reads one process; `None` if it is gone.
pub fn info(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(ProcInfo { pid, ppid, state, args })
}

/// Every process on the machine.
pub fn all() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter_map(info).collect()
}

/// Alive and not a zombie.
pub fn is_alive(pid: i32) -> bool {
    info(pid).is_some_and(|p| p.state != 'Z' && p.state != 'X')
}

/// All descendants of `root` (not including it).
pub fn descendants(root: i32) -> Vec<ProcInfo> {
    let procs = all();
    let mut out: Vec<ProcInfo> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in procs.iter().filter(|c| c.ppid == p) {
            if !out.iter().any(|o| o.pid == c.pid) {
                frontier.push(c.pid);
                out.push(c.clone());
            }
        }
    }
    out
}

/// Processes whose command line mentions `needle` in any argument (e.g. a data dir).
pub fn mentioning(needle: &str) -> Vec<ProcInfo> {
    all().into_iter().filter(|p| p.args.iter().any(|a| a.contains(needle))).collect()
}

pub fn signal(pid: i32, sig: Signal) -> bool {
    kill(Pid::from_raw(pid), sig).is_ok()
}

pub fn signal_group(pgid: i32, sig: Signal) -> bool {
    kill(Pid::from_raw(-pgid), sig).is_ok()
}

/// Whether an argument list names node `node` (e.g. `node-1` as an argument, `--node=node-1`,
/// or a path component such as `/data/node-1/pool.img`), without matching `node-10`.
pub fn args_name_node(args: &[String], node: &str) -> bool {
    args.iter().any(|a| {
        a.split(|c: char| c == '/' || c == '=' || c == ',' || c == ':' || c.is_whitespace())
            .any(|part| part == node)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_match_exactly() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(args_name_node(&a(&["engine", "--node", "node-1"]), "node-1"));
        assert!(args_name_node(&a(&["engine", "--node-id=node-1"]), "node-1"));
        assert!(args_name_node(&a(&["engine", "--pool", "/d/node-1/pool.img"]), "node-1"));
        assert!(!args_name_node(&a(&["engine", "--node", "node-10"]), "node-1"));
    }

    #[test]
    fn sees_itself() {
        let me = std::process::id() as i32;
        let p = info(me).unwrap();
        assert!(is_alive(me));
        assert!(!p.args.is_empty());
    }
}
