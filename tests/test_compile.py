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
