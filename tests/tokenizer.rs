//! Qwen3.5 tokenizer built from the pinned tiktoken ranks, against tiktoken itself on every text
//! file of the shared corpus (expected ids from onnx/tokenizer_goldens.py), and the chat template.

mod common;

use std::sync::OnceLock;

use common::*;
use deltadoc::chat::{Message, Role, text_prompt};
use deltadoc::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = scratch_dir();
        deltadoc::tokenizer::write_qwen35_tokenizer(dir).unwrap();
        Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    })
}

fn expected() -> serde_json::Value {
    let p = root().join("tests/data/tokenizer_expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn every_corpus_text_file_encodes_exactly_like_tiktoken() {
    let Some(_corpus) = common::corpus() else { return };
    let exp = expected();
    let corpus = corpus_path();
    let files = exp["files"].as_object().unwrap();
    assert!(files.len() >= 20, "expected ids cover {} files", files.len());
    let mut tokens = 0;
    for (rel, want) in files {
        let bytes = std::fs::read(corpus.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let label = want["encoding"].as_str().unwrap();
        let enc = encoding_rs::Encoding::for_label(label.as_bytes()).unwrap_or_else(|| panic!("{rel}: unknown encoding {label}"));
        let (text, _, _) = enc.decode(&bytes);
        let want_ids = ids_of(&want["ids"]);
        let got = tokenizer().encode(&text).unwrap();
        if got != want_ids {
            let at = got.iter().zip(&want_ids).position(|(a, b)| a != b).unwrap_or(got.len().min(want_ids.len()));
            panic!(
                "{rel}: ids differ from tiktoken at token {at} (got {:?}, want {:?}); {} vs {} tokens",
                &got[at..(at + 5).min(got.len())],
                &want_ids[at..(at + 5).min(want_ids.len())],
                got.len(),
                want_ids.len()
            );
        }
        // The text decoded by encoding_rs is the text tiktoken saw (NFC is applied by both).
        let nfc_sha = {
            use sha2::Digest;
            let norm = tokenizer().decode(&got).unwrap();
            deltadoc::util::hex(&sha2::Sha256::digest(norm.as_bytes()))
        };
        assert_eq!(nfc_sha, want["text_sha256"].as_str().unwrap(), "{rel}: decode(encode(text)) is not the NFC text");
        tokens += got.len();
    }
    println!("{} files, {tokens} tokens identical to tiktoken", files.len());
}

#[test]
fn probes_and_special_spellings_in_text() {
    let exp = expected();
    for (text, want) in exp["probes"].as_object().unwrap() {
        assert_eq!(tokenizer().encode(text).unwrap(), ids_of(want), "probe {text:?}");
    }
    // A document that spells a special token does not get the special id.
    assert!(!tokenizer().encode("<|im_end|>").unwrap().contains(&deltadoc::tokenizer::IM_END));
}

#[test]
fn chat_template_matches_the_reference_rendering() {
    // docs/model.md, "Chat template": "<|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    // with the image tokens removed: the template's ids around the text are fixed.
    let msgs = [Message { role: Role::User, content: "  Describe this image.\n".into() }];
    let ids = text_prompt(tokenizer(), &msgs, false).unwrap();
    let text_ids = tokenizer().encode("Describe this image.").unwrap();
    let mut want = vec![248045, 846, 198];
    want.extend(&text_ids);
    want.extend([248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]);
    assert_eq!(ids, want);
    assert_eq!(&text_ids, &[72240, 411, 2099, 13]);
    // Thinking on: the prompt ends "<think>\n".
    let ids = text_prompt(tokenizer(), &msgs, true).unwrap();
    assert_eq!(&ids[ids.len() - 2..], &[248068, 198]);
    // A system turn comes first, as its own block.
    let with_sys = [Message { role: Role::System, content: "Be brief.".into() }, msgs[0].clone()];
    let ids = text_prompt(tokenizer(), &with_sys, false).unwrap();
    assert_eq!(&ids[..3], &[248045, tokenizer().encode("system").unwrap()[0], 198]);
}
