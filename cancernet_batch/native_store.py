"""zarr's ``FsspecStore`` for a tile store on S3 or Azure whose whole-object GETs and PUTs (chunks, documents, flags)
go through obstore, the native client of :mod:`cancernet_batch.remote`, at a fifth (S3) to a ninth (Azure) of the
client CPU a request that s3fs or adlfs spends. Everything else (ranges, listings, look-ups, deletes) stays the
fsspec driver's. A request the native client fails is sent again through the driver, whose answer or error is the
one zarr sees; after :data:`~cancernet_batch.remote.NATIVE_GIVE_UP` of those that the driver served, the filesystem
drops the native client. Where there is no native client (neither S3 nor Azure, obstore missing,
``CANCERNET_S3_NATIVE=0``, settings it would not carry) this is zarr's ``FsspecStore`` as it is."""

from __future__ import annotations

from zarr.core.buffer import Buffer
from zarr.storage import FsspecStore
from zarr.storage._fsspec import _dereference_path

from . import remote


class NativeFsspecStore(FsspecStore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remote.no_dead_exit_calls(self.fs)

    def __setstate__(self, state) -> None:  # a Dask task's copy: its filesystem is a new instance in this process
        self.__dict__.update(state)
        remote.no_dead_exit_calls(self.fs)

    async def get(self, key, prototype, byte_range=None):  # noqa: D102 - zarr's
        native = await remote._native_async(self.fs) if byte_range is None else None
        if native is None:
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        path = _dereference_path(self.path, key)
        try:
            data = await remote._native_object(native, path)
        except Exception as exc:  # noqa: BLE001 - s3fs reads it again
            if remote.not_found(exc):
                return None
            remote._native_failed(exc, path)
            value = await super().get(key, prototype, byte_range)
            if value is not None:
                remote._native_served(self.fs, native, exc)
            return value
        return prototype.buffer.from_bytes(data)

    async def set(self, key, value, byte_range=None):  # noqa: D102 - zarr's
        native = (await remote._native_async(self.fs)
                  if byte_range is None and isinstance(value, Buffer) and not self.read_only else None)
        if native is None:
            return await super().set(key, value, byte_range)
        if not self._is_open:
            await self._open()
        path = _dereference_path(self.path, key)
        try:
            await remote._native_put(native, path, value.to_bytes())
        except Exception as exc:  # noqa: BLE001 - s3fs writes it again
            remote._native_failed(exc, path)
            await super().set(key, value, byte_range)
            remote._native_served(self.fs, native, exc)
