import warnings

from projq_train.quiet import silence_known_noise


def test_known_noise_is_filtered_narrowly():
    emitted = [
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),
        ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning),
        ("`is_gradient_checkpointing` now means something else", FutureWarning),
        ("a warning about the user's run", UserWarning),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()
        for message, category in emitted:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in seen] == [m for m, _ in emitted[2:]]
