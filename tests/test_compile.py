"""pipe.compile(): torch.compile with inductor weight freezing gives the eager pipeline's images, and is rebuilt
when the weights change (frozen constants would otherwise go stale)."""
import pytest
import torch

from pipelines.compiled import CompiledNetwork
from pipelines.text_to_image import TextToImagePipeline


def latents(pipe, seed=0):
    return pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, seed=seed, output_type="latent",
                progress=False).images


def test_inductor_matches_eager_and_follows_weight_edits(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    eager = latents(pipe)
    pipe.compile("inductor")
    assert torch.allclose(latents(pipe), eager, atol=1e-4)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)  # an in-place edit, as load_state_dict or an optimizer makes
    compiled_after_edit = latents(pipe)
    pipe.unet.conv_out.bias = torch.nn.Parameter(pipe.unet.conv_out.bias + 0.5)  # a replaced tensor
    compiled_after_replace = latents(pipe)
    pipe.compile("eager")
    eager_after_replace = latents(pipe)
    pipe.unet.conv_out.bias = torch.nn.Parameter(pipe.unet.conv_out.bias - 0.5)
    eager_after_edit = latents(pipe)
    assert (eager_after_edit - eager).abs().max() > 1e-2  # the edit matters
    assert (eager_after_replace - eager_after_edit).abs().max() > 1e-2  # so does the replacement
    assert torch.allclose(compiled_after_edit, eager_after_edit, atol=1e-4)
    assert torch.allclose(compiled_after_replace, eager_after_replace, atol=1e-4)


def snapshot_compiler(module):
    """A stand-in for weight freezing: the module's weights as they were at compile time."""
    frozen = {k: v.clone() for k, v in module.state_dict().items()}

    def call(x):
        return torch.func.functional_call(module, frozen, (x,))

    return call


def test_compiled_network_recompiles_on_new_weights_adapters_and_state():
    layer = torch.nn.Linear(3, 2)
    scale = {"value": 1.0}
    network = CompiledNetwork(layer, layer, lambda: (scale["value"],), compiler=snapshot_compiler)
    x = torch.randn(4, 3)
    assert torch.equal(network(x), layer(x))
    with torch.no_grad():
        layer.weight.add_(1.0)  # in place
    assert not torch.equal(network(x), layer(x))  # seen at the next refresh (the pipeline's next request)
    network.refresh()
    assert torch.equal(network(x), layer(x))
    layer.bias = torch.nn.Parameter(torch.zeros(2))  # replaced
    network.refresh()
    assert torch.equal(network(x), layer(x))
    layer.extra = torch.nn.Linear(2, 2)  # an added layer (as an adapter), same forward
    compiled = network.compiled
    network.refresh()
    assert network.compiled is not compiled
    compiled = network.compiled
    network.refresh()
    assert network.compiled is compiled  # unchanged weights: no recompile
    scale["value"] = 0.5
    network.refresh()
    assert network.compiled is not compiled


def test_compile_refuses_unknown_backend(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    with pytest.raises(ValueError, match="unknown compile backend 'tensorrt'"):
        pipe.compile("tensorrt")


def test_guard_skipping_dispatches_new_shapes_and_survives_a_reset(tiny_model_factory):
    """Calls whose signature ran before skip dynamo's guards; a new batch size must still compile its own graph,
    and a compiler.reset() from elsewhere must not leave a call without a graph."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())

    def both(p):
        return [p("a red circle", num_inference_steps=2, guidance_scale=3.0, seed=0, num_images_per_prompt=n,
                  output_type="latent", progress=False).images for n in (1, 2)]

    eager = both(pipe)
    pipe.compile("inductor")
    first = both(pipe)  # each batch size compiles with full guards, its second step skips them
    second = both(pipe)  # both signatures seen: guards skipped, graphs still told apart by shape
    torch.compiler.reset()
    after_reset = both(pipe)
    for run in (first, second, after_reset):
        for got, want in zip(run, eager):
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)


def test_call_signature_tells_apart_what_graphs_specialise_on():
    from pipelines.compiled import call_signature

    x = torch.zeros(2, 3)
    base = call_signature((x,), {"t": torch.ones(2), "flag": True})
    assert call_signature((torch.ones(2, 3),), {"t": torch.zeros(2), "flag": True}) == base  # values don't matter
    assert call_signature((torch.zeros(4, 3),), {"t": torch.ones(2), "flag": True}) != base  # shapes do
    assert call_signature((x.t().contiguous().t(),), {"t": torch.ones(2), "flag": True}) != base  # strides
    assert call_signature((x.double(),), {"t": torch.ones(2), "flag": True}) != base  # dtypes
    assert call_signature((x,), {"t": torch.ones(2), "flag": False}) != base  # other arguments
    assert call_signature((x,), {"t": torch.ones(2)}) != base
    with torch.no_grad():
        assert call_signature((x,), {"t": torch.ones(2), "flag": True}) != base  # grad mode
    with pytest.raises(TypeError):
        call_signature((x,), {"options": {"a": set()}})  # unhashable: no signature, so full guards
