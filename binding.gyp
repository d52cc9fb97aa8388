{
  "targets": [
    {
      "target_name": "priortune",
      "sources": [
        "native/addon.cpp",
        "<!@(node -p \"require('fs').readdirSync('native').filter(f => f.endsWith('.cpp') && f !== 'addon.cpp').map(f => 'native/' + f).join(' ')\")",
        "<!@(node -p \"require('fs').readdirSync('kernels/cpu').filter(f => f.endsWith('.cpp')).map(f => 'kernels/cpu/' + f).join(' ')\")"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "kernels/include"
      ],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-fno-math-errno", "-fopenmp", "-Wno-unknown-pragmas"],
      "ldflags": ["-fopenmp"],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "OTHER_CPLUSPLUSFLAGS": ["-std=c++17", "-O3", "-Xpreprocessor", "-fopenmp"]
      }
    }
  ]
}
