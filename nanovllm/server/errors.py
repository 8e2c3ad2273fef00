"""OpenAI's error shape, and the exception a bad request raises to get one."""


class RequestError(Exception):
    """A problem with the request, reported to the client in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status_code, self.code, self.type = (
            message,
            param,
            status_code,
            code,
            type,
        )

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
