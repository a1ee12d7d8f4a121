//! Hostile input (issue 5): property-based fuzzing of the whole decode path — envelope,
//! context, instance primitive, arguments — on arbitrary bytes and on mutations of a real
//! Nova cast. It must never panic, and whatever it accepts carries identifiers that are
//! canonical UUIDs (they end up in RBD names, paths and URLs). The budget is fixed:
//! `FUZZ_CASES` cases per property (default 3000), so CI time stays bounded.

mod common;

use common::shared_fixture;
use novasnap::messaging::dispatcher::dispatch;
use novasnap::messaging::envelope::decode;
use proptest::prelude::*;
use serde_json::{json, Value};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(3000)
}

fn nova_cast() -> Value {
    let f = shared_fixture("messages/rpc_cast.backup_instance.nova_rich.json");
    f["decoded"]["oslo.message"].clone()
}

/// Whether `s` is a UUID in the canonical 8-4-4-4-12 hyphenated text (any case).
fn canonical_uuid_text(s: &str) -> bool {
    s.len() == 36
        && s.bytes()
            .enumerate()
            .all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { b.is_ascii_hexdigit() })
}

/// Decodes and dispatches; on success checks what the rest of novasnap relies on: the ids
/// it accepted are the very ones the cast carried, and the cast carried them in canonical
/// form (an id the decoder turned into a UUID from some other text, braced, URN or bare
/// hex, would let a cast name an image other than the one written in it).
fn check(content_type: Option<&str>, body: &[u8]) {
    let Ok(message) = decode(content_type, body, 1 << 20) else { return };
    let Ok(req) = dispatch(&message) else { return };
    let message = Value::Object(message);
    let sent = |pointer: &str| message.pointer(pointer).and_then(Value::as_str).map(str::to_owned);
    for (pointer, accepted) in
        [("/args/image_id", req.image_id), ("/args/instance/nova_object.data/uuid", req.instance.uuid)]
    {
        let sent = sent(pointer).unwrap_or_else(|| panic!("accepted {accepted} though {pointer} is not a string"));
        assert!(canonical_uuid_text(&sent), "{pointer}: accepted {sent:?}, not a canonical UUID");
        assert_eq!(sent.to_ascii_lowercase(), accepted.to_string(), "{pointer}: the id accepted is the id sent");
    }
    assert!(!format!("{req:?}").contains("fixtureToken"));
}

/// Texts a UUID parser may take for a UUID though they are not its canonical form.
fn uuid_lookalike() -> impl Strategy<Value = String> {
    any::<u128>().prop_flat_map(|bits| {
        let id = uuid::Uuid::from_u128(bits);
        prop_oneof![
            Just(id.to_string()),
            Just(id.to_string().to_uppercase()),
            Just(id.simple().to_string()),
            Just(id.braced().to_string()),
            Just(id.urn().to_string()),
            Just(format!(" {id}")),
            Just(format!("{id}\n")),
            Just(id.to_string().replacen('-', "", 1) + "0"),
        ]
    })
}

/// Arbitrary JSON values, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        uuid_lookalike().prop_map(Value::from),
        Just(Value::from("../../etc/passwd")),
        Just(Value::from("9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every JSON pointer in `v` (objects and arrays), for choosing what to mutate.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            m.iter().for_each(|(k, v)| pointers(v, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out))
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| pointers(v, format!("{at}/{i}"), out)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), msgpack in any::<bool>()) {
        check(Some(if msgpack { "application/msgpack" } else { "application/json" }), &body);
    }

    #[test]
    fn ids_are_accepted_only_in_their_canonical_form(id in uuid_lookalike(), instance in any::<bool>(), as_envelope in any::<bool>()) {
        let mut cast = nova_cast();
        let pointer = if instance { "/args/instance/nova_object.data/uuid" } else { "/args/image_id" };
        *cast.pointer_mut(pointer).unwrap() = Value::from(id);
        let body = if as_envelope {
            json!({"oslo.version": "2.0", "oslo.message": cast.to_string()}).to_string()
        } else {
            cast.to_string()
        };
        check(Some("application/json"), body.as_bytes());
    }

    #[test]
    fn mutated_nova_casts_never_panic_and_never_smuggle_ids(pick in any::<prop::sample::Index>(), replacement in json_value(), as_envelope in any::<bool>()) {
        let mut cast = nova_cast();
        let mut all = Vec::new();
        pointers(&cast, String::new(), &mut all);
        let target = pick.get(&all).clone();
        if let Some(slot) = cast.pointer_mut(&target) {
            *slot = replacement;
        }
        let body = if as_envelope {
            json!({"oslo.version": "2.0", "oslo.message": cast.to_string()}).to_string()
        } else {
            cast.to_string()
        };
        check(Some("application/json"), body.as_bytes());
        let packed = rmp_serde::to_vec_named(&json!({"oslo.version": "2.0", "oslo.message": cast.to_string()})).unwrap();
        check(Some("application/msgpack"), &packed);
    }
}
