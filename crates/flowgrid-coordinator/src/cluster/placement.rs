//! Which live member should own a shard: rendezvous (highest random weight) hashing.
//!
//! Every member computes the same answer from the same member set, without talking to
//! the others. When a member joins, only the shards it now wins move (about 1/N of them);
//! when a member leaves, only its shards move, spread over the rest.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The member of `members` that should own `shard`, or `None` when there is no member.
pub fn owner_of<'a>(shard: u32, members: &[&'a str]) -> Option<&'a str> {
    members.iter().copied().max_by_key(|member| (weight(shard, member), *member))
}

fn weight(shard: u32, member: &str) -> u64 {
    xxh3_64_with_seed(member.as_bytes(), u64::from(shard))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|index| format!("node-{index}")).collect()
    }

    fn owners(shards: u32, members: &[String]) -> Vec<String> {
        let refs: Vec<&str> = members.iter().map(String::as_str).collect();
        (0..shards).map(|shard| owner_of(shard, &refs).expect("a member").to_owned()).collect()
    }

    #[test]
    fn no_member_owns_nothing() {
        assert_eq!(owner_of(3, &[]), None);
    }

    #[test]
    fn shards_spread_evenly() {
        let members = names(4);
        let owners = owners(4096, &members);
        for member in &members {
            let owned = owners.iter().filter(|owner| *owner == member).count();
            assert!((820..=1230).contains(&owned), "{member} owns {owned} of 4096");
        }
    }

    proptest! {
        #[test]
        fn the_order_of_members_does_not_matter(count in 1usize..8, shard in 0u32..10_000) {
            let members = names(count);
            let mut refs: Vec<&str> = members.iter().map(String::as_str).collect();
            let forward = owner_of(shard, &refs);
            refs.reverse();
            prop_assert_eq!(forward, owner_of(shard, &refs));
        }

        #[test]
        fn a_joining_member_takes_shards_only_for_itself(count in 1usize..8) {
            let before = names(count);
            let mut after = before.clone();
            after.push("joiner".to_owned());
            let (old, new) = (owners(1024, &before), owners(1024, &after));
            let moved = old.iter().zip(&new).filter(|(left, right)| left != right).count();
            for (left, right) in old.iter().zip(&new) {
                prop_assert!(left == right || right == "joiner");
            }
            // About 1/(N+1) of the shards move; allow a wide margin for small N.
            let expected = 1024 / (count + 1);
            prop_assert!(moved <= expected * 3 / 2 + 32, "moved {} expected about {}", moved, expected);
        }

        #[test]
        fn a_leaving_member_gives_up_only_its_own_shards(count in 2usize..8, leaver in 0usize..8) {
            let before = names(count);
            let leaver = before[leaver % count].clone();
            let after: Vec<String> = before.iter().filter(|member| **member != leaver).cloned().collect();
            let (old, new) = (owners(1024, &before), owners(1024, &after));
            for (left, right) in old.iter().zip(&new) {
                prop_assert!(left == right || *left == leaver);
            }
        }
    }
}
