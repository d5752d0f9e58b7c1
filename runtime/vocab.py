"""The words bundles, manifests, configs and every CLI share, each defined once (imports nothing).

Everything else imports these: a CLI's `choices`, a manifest check and a build switch cannot drift apart.
"""

# bundle components, in build order; a bundle without a face encoder still generates (no FaceSim then)
COMPONENTS = ("text_gemma", "text_head", "dit", "vae_encoder", "vae_decoder", "face_encoder")
REQUIRED_COMPONENTS = ("text_gemma", "text_head", "dit", "vae_encoder", "vae_decoder")
# the text side, two engines: Gemma-3 (token ids -> every hidden state), then the head (feature extractor +
# connector: hidden states -> DiT context); a staged run holds one at a time
TEXT_COMPONENTS = ("text_gemma", "text_head")
OLD_TEXT_COMPONENT = "text_encoder"  # bundles built before the split held both in this one engine: refused
BUCKET_SIZED = ("dit", "vae_encoder", "vae_decoder")  # input shapes follow the bucket (the others: fixed)
# a two-stage bundle's extra components: the x2 latent upsampler and the DiT with the refinement LoRA
STAGE_COMPONENTS = ("upsampler", "dit_refine")
STAGES = (1, 2)  # sampling stages of a generation: 1 = the output size only; 2 = half size, upsample, refine

BACKENDS = ("onnxruntime", "torch", "aoti", "tensorrt")
ONNX_BACKENDS = ("onnxruntime", "tensorrt")  # engines built from an exported ONNX file
TORCH_BACKENDS = ("torch", "aoti")  # engines exported through torch.export (AOTInductor compiles it)
CODE_BACKENDS = TORCH_BACKENDS  # loading one runs code from the bundle (pickle, shared library)
CUDA_GRAPH_BACKENDS = TORCH_BACKENDS  # the only engines that replay captured CUDA graphs

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# what each backend builds (the torch fast path's bf16/fp8 is the DiT's; its other components stay fp32)
BACKEND_PRECISIONS = {
    "onnxruntime": ("fp32", "fp16"),
    "tensorrt": PRECISIONS,
    "torch": ("fp32", "bf16", "fp8"),
    "aoti": ("fp32", "bf16", "fp8"),
}

# manifest model_config.family, export/config.py ModelFamily's values (bundles written before it: ltx2)
MODEL_FAMILIES = ("ltx2", "ltx2.3")

# pre-quantized checkpoints read as build input (export/fp8_source.py): Lightricks' FP8 files' format, and the
# float8 weight layouts accepted ([out, in] as ltx-core's files; [in, out] as ltx-core holds them once loaded)
SOURCE_QUANT_FORMATS = ("float8_e4m3fn-per-tensor",)
# where an FP8 engine's scales came from: modelopt's calibration, or the pre-quantized checkpoint's own
FP8_SCALE_SOURCES = ("calibration", "checkpoint")
WEIGHT_LAYOUTS = ("out_in", "in_out")

LAYOUTS = ("tass", "overlap", "width_shift", "before")  # reference token positions (tass = TASS-RoPE)

FIXED_PLANS = ("all", "staged")  # every engine resident, or each loaded for its stage
MEMORY_PLANS = (*FIXED_PLANS, "auto")  # auto: one of the fixed plans, by free device memory

CONCRETE_DEVICES = ("cpu", "cuda")
DEVICES = ("auto", *CONCRETE_DEVICES)  # auto: CUDA when the bundle's backend can use it here, else CPU
