import lordba


def test_every_public_name_exists_and_errors_share_one_base():
    for name in lordba.__all__:
        assert hasattr(lordba, name), name
    errors = [getattr(lordba, n) for n in lordba.__all__ if n.endswith("Error")]
    assert all(issubclass(e, lordba.LoRDBAError) for e in errors)
