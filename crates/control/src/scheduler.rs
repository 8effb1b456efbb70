//! Replica placement: a pure function from candidate pools to a choice, so it can be tested
//! without a cluster.
//!
//! Rules: only pools that are online on online, uncordoned nodes are candidates (the caller
//! filters); each replica of a volume goes to a different node; among the pools of a node the
//! one with the most free space wins, and nodes are taken in order of their best pool's free
//! space. A thick replica needs its full size free; a thin one needs nothing reserved.

use trireme_types::{ByteSize, NodeId, PoolId};

/// A pool the scheduler may place a replica on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub pool: PoolId,
    pub node: NodeId,
    pub free: ByteSize,
}

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no pool is online on an online, uncordoned node; create a pool first")]
    NoPools,
    #[error(
        "a volume of {size} does not fit: the largest free space on any usable pool is {largest_free}"
    )]
    InsufficientCapacity { size: ByteSize, largest_free: ByteSize },
    #[error(
        "{wanted} replicas need {wanted} different nodes with room for {size}; only {available} have it"
    )]
    NotEnoughNodes { wanted: usize, available: usize, size: ByteSize },
}

/// Picks `count` pools on distinct nodes (none of them in `exclude_nodes`) for a replica of
/// `size`.
pub fn place(
    candidates: &[Candidate],
    count: usize,
    size: ByteSize,
    thin: bool,
    exclude_nodes: &[NodeId],
) -> Result<Vec<Candidate>, PlacementError> {
    let usable: Vec<&Candidate> =
        candidates.iter().filter(|c| !exclude_nodes.contains(&c.node)).collect();
    if usable.is_empty() {
        return Err(PlacementError::NoPools);
    }
    let fits = |c: &&Candidate| thin || c.free >= size;
    let mut fitting: Vec<&Candidate> = usable.iter().copied().filter(fits).collect();
    if fitting.is_empty() {
        let largest_free = usable.iter().map(|c| c.free).max().unwrap_or(ByteSize::ZERO);
        return Err(PlacementError::InsufficientCapacity { size, largest_free });
    }
    // Most free space first; the pool name breaks ties so placement is deterministic.
    fitting.sort_by(|a, b| b.free.cmp(&a.free).then_with(|| a.pool.cmp(&b.pool)));
    let mut chosen: Vec<Candidate> = Vec::with_capacity(count);
    for c in fitting {
        if chosen.len() == count {
            break;
        }
        if !chosen.iter().any(|x| x.node == c.node) {
            chosen.push(c.clone());
        }
    }
    if chosen.len() < count {
        return Err(PlacementError::NotEnoughNodes {
            wanted: count,
            available: chosen.len(),
            size,
        });
    }
    Ok(chosen)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn c(pool: &str, node: &str, free_mib: u64) -> Candidate {
        Candidate {
            pool: PoolId::new(pool).unwrap(),
            node: NodeId::new(node).unwrap(),
            free: ByteSize::mib(free_mib),
        }
    }

    #[test]
    fn picks_the_pool_with_most_free_space() {
        let cands = [c("p1", "n1", 100), c("p2", "n2", 300), c("p3", "n3", 200)];
        let got = place(&cands, 1, ByteSize::mib(50), false, &[]).unwrap();
        assert_eq!(got[0].pool.as_str(), "p2");
    }

    #[test]
    fn places_n_replicas_on_distinct_nodes() {
        let cands = [c("a1", "n1", 500), c("a2", "n1", 400), c("b", "n2", 100), c("c", "n3", 50)];
        let got = place(&cands, 3, ByteSize::mib(10), false, &[]).unwrap();
        let nodes: Vec<_> = got.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(nodes, ["n1", "n2", "n3"]);
        assert_eq!(got[0].pool.as_str(), "a1");
        assert!(matches!(
            place(&cands, 4, ByteSize::mib(10), false, &[]),
            Err(PlacementError::NotEnoughNodes { wanted: 4, available: 3, .. })
        ));
        let excl =
            place(&cands, 1, ByteSize::mib(10), false, &[NodeId::new("n1").unwrap()]).unwrap();
        assert_eq!(excl[0].node.as_str(), "n2");
    }

    #[test]
    fn too_large_names_the_size_and_the_largest_free_space() {
        let cands = [c("p1", "n1", 100), c("p2", "n2", 300)];
        let err = place(&cands, 1, ByteSize::gib(1), false, &[]).unwrap_err();
        assert_eq!(
            err,
            PlacementError::InsufficientCapacity {
                size: ByteSize::gib(1),
                largest_free: ByteSize::mib(300)
            }
        );
        assert!(err.to_string().contains("1GiB") && err.to_string().contains("300MiB"));
        // Thin volumes reserve nothing, so they fit.
        assert!(place(&cands, 1, ByteSize::gib(1), true, &[]).is_ok());
        assert_eq!(place(&[], 1, ByteSize::mib(1), false, &[]), Err(PlacementError::NoPools));
    }
}
