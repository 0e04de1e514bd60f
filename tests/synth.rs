//! `model synth` writes seeded random weights through the importer path, and `--hf-out` writes the
//! very same weights as a Hugging Face checkpoint: importing that checkpoint must reproduce the
//! synthesised model folder byte for byte.

mod common;

use common::deltadoc;

#[test]
fn synth_hf_out_reimports_to_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, hf, b) = (tmp.path().join("synth"), tmp.path().join("hf"), tmp.path().join("reimported"));
    deltadoc(&[
        "model",
        "synth",
        "--shape",
        "tiny",
        "--seed",
        "7",
        "--out",
        a.to_str().unwrap(),
        "--hf-out",
        hf.to_str().unwrap(),
    ]);
    deltadoc(&["model", "import", hf.to_str().unwrap(), "--out", b.to_str().unwrap()]);
    let ma = deltadoc::model::ModelDir::open(&a).unwrap().manifest;
    let mb = deltadoc::model::ModelDir::open(&b).unwrap().manifest;
    assert_eq!(ma.config, mb.config);
    // Sharded checkpoint (one shard per layer plus the index).
    assert!(hf.join("model.safetensors.index.json").is_file());
    assert_eq!(ma.files["model.onnx.data"], mb.files["model.onnx.data"], "weights differ after the Hugging Face round trip");
    assert_eq!(ma.config.vocab_size, 248_320);
    // Another seed gives other weights.
    let c = tmp.path().join("seed8");
    deltadoc(&["model", "synth", "--shape", "tiny", "--seed", "8", "--out", c.to_str().unwrap()]);
    let mc = deltadoc::model::ModelDir::open(&c).unwrap().manifest;
    assert_ne!(ma.files["model.onnx.data"], mc.files["model.onnx.data"]);
}
