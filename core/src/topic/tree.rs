//! `TopicTree<V>`: values stored under topic *names* (the retained messages of a shard), found by
//! a topic *filter*. The inverse of [`super::SubscriptionTrie`]: a subscribe walks only the
//! branches its filter can match (literal levels descend, `+` fans out one level, `#` takes a
//! whole subtree) instead of testing every stored topic.

use std::collections::HashMap;

use super::{TopicFilter, TopicName};

#[derive(Debug)]
struct Node<V> {
    value: Option<(TopicName, V)>,
    children: HashMap<Box<str>, Node<V>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node { value: None, children: HashMap::new() }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.is_empty()
    }
}

/// Topic name -> value, at most one value per topic.
#[derive(Debug)]
pub struct TopicTree<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for TopicTree<V> {
    fn default() -> Self {
        TopicTree { root: Node::default(), len: 0 }
    }
}

impl<V> TopicTree<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Store `value` under `topic`, returning the value it replaces.
    pub fn insert(&mut self, topic: &TopicName, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.levels() {
            node = node.children.entry(Box::from(level)).or_default();
        }
        let old = node.value.replace((topic.clone(), value)).map(|(_, v)| v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Remove the value under `topic`, pruning the branches that become empty.
    pub fn remove(&mut self, topic: &TopicName) -> Option<V> {
        let levels: Vec<&str> = topic.levels().collect();
        let removed = remove_at(&mut self.root, &levels);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Call `f` for every stored (topic, value) whose topic `filter` matches (MQTT 4.7, with the
    /// rule that a filter starting with a wildcard does not match `$`-topics).
    pub fn for_each_match<'a>(&'a self, filter: &TopicFilter, mut f: impl FnMut(&'a TopicName, &'a V)) {
        let levels: Vec<&str> = filter.levels().collect();
        walk(&self.root, &levels, true, &mut f);
    }
}

impl<V> TopicTree<V> {
    /// The value stored under `topic`.
    pub fn get(&self, topic: &TopicName) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.levels() {
            node = node.children.get(level)?;
        }
        node.value.as_ref().map(|(_, v)| v)
    }

    /// Call `f` for every stored (topic, value), `$`-topics included.
    pub fn for_each<'a>(&'a self, mut f: impl FnMut(&'a TopicName, &'a V)) {
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            if let Some((t, v)) = &node.value {
                f(t, v);
            }
            stack.extend(node.children.values());
        }
    }
}

fn remove_at<V>(node: &mut Node<V>, levels: &[&str]) -> Option<V> {
    match levels.split_first() {
        None => node.value.take().map(|(_, v)| v),
        Some((first, rest)) => {
            let child = node.children.get_mut(*first)?;
            let removed = remove_at(child, rest);
            if child.is_empty() {
                node.children.remove(*first);
            }
            removed
        }
    }
}

fn walk<'a, V>(node: &'a Node<V>, filter: &[&str], at_root: bool, f: &mut impl FnMut(&'a TopicName, &'a V)) {
    let Some((level, rest)) = filter.split_first() else {
        if let Some((t, v)) = &node.value {
            f(t, v);
        }
        return;
    };
    // At the root, a wildcard does not match a level starting with '$' (MQTT 4.7.2).
    let eligible = |name: &str| !(at_root && name.starts_with('$'));
    match *level {
        "#" => {
            // `#` also matches the parent level itself ("sport/#" matches "sport").
            if let Some((t, v)) = &node.value {
                if !at_root {
                    f(t, v);
                }
            }
            for (name, child) in &node.children {
                if eligible(name) {
                    each_value(child, f);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if eligible(name) {
                    walk(child, rest, false, f);
                }
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                walk(child, rest, false, f);
            }
        }
    }
}

fn each_value<'a, V>(node: &'a Node<V>, f: &mut impl FnMut(&'a TopicName, &'a V)) {
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if let Some((t, v)) = &n.value {
            f(t, v);
        }
        stack.extend(n.children.values());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(tree: &TopicTree<u32>, filter: &str) -> Vec<u32> {
        let mut v = Vec::new();
        tree.for_each_match(&TopicFilter::new(filter).unwrap(), |_, x| v.push(*x));
        v.sort_unstable();
        v
    }

    #[test]
    fn mqtt_4_7_filters_find_their_topics() {
        let mut t = TopicTree::new();
        for (i, name) in ["sport", "sport/tennis", "sport/tennis/p1", "/finance", "$SYS/up", "a//b"].iter().enumerate() {
            t.insert(&TopicName::new(name).unwrap(), i as u32);
        }
        assert_eq!(matches(&t, "sport/#"), vec![0, 1, 2]);
        assert_eq!(matches(&t, "sport/+"), vec![1]);
        assert_eq!(matches(&t, "#"), vec![0, 1, 2, 3, 5]);
        assert_eq!(matches(&t, "+/+"), vec![1, 3]);
        assert_eq!(matches(&t, "$SYS/#"), vec![4]);
        assert_eq!(matches(&t, "+/up"), Vec::<u32>::new());
        assert_eq!(matches(&t, "a/+/b"), vec![5]);
        assert_eq!(t.remove(&TopicName::new("sport/tennis").unwrap()), Some(1));
        assert_eq!(matches(&t, "sport/#"), vec![0, 2]);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn remove_prunes_to_empty() {
        let mut t = TopicTree::new();
        let name = TopicName::new("a/b/c").unwrap();
        t.insert(&name, 1);
        assert_eq!(t.insert(&name, 2), Some(1));
        assert_eq!(t.remove(&name), Some(2));
        assert!(t.is_empty() && t.root.is_empty());
        assert_eq!(t.remove(&name), None);
    }
}
