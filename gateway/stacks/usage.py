"""What `gateway up` prints once its stack is up: the same for the mock stack and the Ray stack."""

USAGE = """\
  Base URL: {base}/v1

  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "mock", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key='none'); \\
print(c.chat.completions.create(model='mock', messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)"

  Gateway endpoints: {base}/-/routes  {base}/-/metrics  {base}/-/ready  {base}/-/usage
  Tokens used per model: gateway keys usage --url {base}
"""
