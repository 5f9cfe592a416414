//! Subscription trie. (Implementation in progress.)
pub struct SubscriptionTrie<V> {
    _v: std::marker::PhantomData<V>,
}
